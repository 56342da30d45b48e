"""Rule filters of SFT curation (`alignment.sft_curation`): each returns why a conversation fails
it, or None, so the pipeline can count every removed row under its reason with the detail."""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from typing import Any

from alignment.data_files import DataError
from alignment.messages import Message
from alignment.sft_data import to_conversation

# Refusals and assistant boilerplate that teach a model to dodge; regexes, matched case-insensitively.
DEFAULT_BOILERPLATE = [
    r"\bas an ai(?: language)? model\b",
    r"\bI(?: am|'m) (?:sorry|afraid),? (?:but )?I (?:can(?:no|')t|am unable to|won't)\b",
    r"^\s*I (?:cannot|can't|won't|am unable to) (?:help|assist|provide|answer|comply)\b",
    r"\bI do not have (?:personal )?(?:opinions|feelings|the ability)\b",
    r"\blorem ipsum\b",
]


def conversation_id(messages: list[Message]) -> str:
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def role_problem(messages: list[Message]) -> str | None:
    """Chat templates expect: optional system first, then user/assistant alternating, user first."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            return f"turn {i + len(messages) - len(turns)} is {msg['role']!r}, expected {expected!r}"
    return None


def length_problem(messages: list[Message], min_chars: int, max_chars: int) -> tuple[str, str] | None:
    for i, msg in enumerate(messages):
        n = len(msg["content"].strip())
        if n == 0:
            return "empty", f"messages[{i}] ({msg['role']}) is empty"
        if n < min_chars and msg["role"] != "system":
            return "too_short", f"messages[{i}] ({msg['role']}) has {n} < {min_chars} characters"
        if n > max_chars:
            return "too_long", f"messages[{i}] ({msg['role']}) has {n} > {max_chars} characters"
    return None


@cache
def _language_identifier() -> Any:
    # py3langid's bundled model is a numpy archive (no pickle), loaded once per process.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) by py3langid's bundled model (offline, deterministic)."""
    # Bytes, so a lone surrogate in user data is replaced instead of failing the encode.
    return _language_identifier().classify(text.encode("utf-8", "replace"))


def language_problem(messages: list[Message], languages: list[str] | None, min_chars: int) -> str | None:
    if not languages:
        return None
    text = "\n".join(m["content"] for m in messages if m["role"] != "system")
    if len(text.strip()) < min_chars:
        return None
    code, prob = detect_language(text)
    return None if code in languages else f"detected {code!r} (p={prob:.2f}), keeping {languages}"


def repeated_ngram_fraction(text: str, n: int) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0 = none repeat)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def repetition_problem(messages: list[Message], n: int, max_fraction: float | None) -> str | None:
    if max_fraction is None:
        return None
    for i, msg in enumerate(messages):
        # Below ~4 n-grams a single repeat is a large share of a perfectly fine reply.
        if msg["role"] == "assistant" and len(msg["content"].split()) >= n + 3:
            frac = repeated_ngram_fraction(msg["content"], n)
            if frac > max_fraction:
                return f"messages[{i}]: {frac:.0%} of its {n}-grams repeat (max {max_fraction:.0%})"
    return None


def boilerplate_problem(messages: list[Message], patterns: list[re.Pattern[str]]) -> str | None:
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        for pattern in patterns:
            if match := pattern.search(msg["content"]):
                return f"messages[{i}] matches {pattern.pattern!r}: {match.group(0)!r}"
    return None


def structure(row: dict[str, Any], where: str) -> tuple[list[Message] | None, str, str]:
    """(conversation or None, reason, detail): shape errors are a filter here, not the end of the run."""
    raw = row.get("messages")
    if isinstance(raw, list) and raw and all(isinstance(m, dict) for m in raw):
        for i, msg in enumerate(raw):
            if isinstance(msg.get("content"), str) and not msg["content"].strip():
                return None, "empty", f"messages[{i}] ({msg.get('role')}) is empty"
    try:
        messages = to_conversation(row, where)
    except DataError as exc:
        return None, "malformed_roles", str(exc).removeprefix(f"{where}: ")
    if problem := role_problem(messages):
        return None, "malformed_roles", problem
    return messages, "", ""
