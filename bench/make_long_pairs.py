"""Deterministic long multi-turn preference pairs with the length profile of real chat preference data.

    PREFLOOP_HOME=/tmp/pfhome python bench/make_long_pairs.py --pairs 2000 --out /tmp/long.jsonl

Target profile, measured on a public multi-turn preference set under SmolLM2's chat template
(issue 14): prompt tokens p10/p50/p90 = 40/124/299 (max 880), median 3 prompt messages (up to 23),
completion tokens (response + end-of-turn, what follows the generation prompt) chosen 8/27/88 and
rejected 9/35/108. Lengths are drawn from two-piece log-normals through those percentiles; half the
prompts carry one of several system prompts (the others get the template's default one), so a batch
rarely shares more than the template's first tokens. Text is words from the tokenizer's own
vocabulary, padded or trimmed until each part has its drawn token count. Same seed, same file.
The script prints the statistics it reached, measured with the real tokenizer.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
# (p10, p50, p90, max) of each part, in tokens under the chat template.
PROMPT = (40, 124, 299, 880)
CHOSEN = (8, 27, 88, 400)
REJECTED = (9, 35, 108, 400)
MAX_MESSAGES = 23
Z90 = 1.2816  # standard normal 90th percentile
SYSTEM_PROMPTS = [
    "You are a concise assistant. Answer in as few words as the question allows.",
    "You are a friendly tutor for high-school mathematics. Explain each step.",
    "You are a customer-support agent for an online bookshop. Be polite and specific.",
    "You are a senior Python reviewer. Point out bugs before style.",
    "Answer as a travel guide who has lived in Lisbon for twenty years.",
    "You are a medical information assistant; you never diagnose and always suggest seeing a doctor.",
    "Reply in plain English suitable for a ten-year-old.",
    "You are an expert chef. Give quantities in grams.",
    "You write SQL for PostgreSQL 16 and explain the query plan when asked.",
    "Be a Socratic teacher: answer questions with guiding questions.",
    "You are a legal research assistant. Cite the statute you rely on.",
    "You summarise scientific papers for busy engineers, in bullet points.",
]


def draw(rng: random.Random, p10: int, p50: int, p90: int, top: int, low: int = 1) -> int:
    """A two-piece log-normal through (p10, p50, p90), clipped to [low, top]."""
    z = rng.gauss(0.0, 1.0)
    edge = p10 if z < 0 else p90
    sigma = abs(math.log(edge / p50)) / Z90
    return max(low, min(top, round(p50 * math.exp(sigma * z))))


def vocabulary(tokenizer: Any) -> list[str]:
    """Lower-case alphabetic words that are one token with their leading space (sorted: deterministic)."""
    words = set()
    for token in tokenizer.get_vocab():
        if token.startswith("Ġ") and token[1:].isalpha() and token[1:].islower() and len(token) > 3:
            words.add(token[1:])
    return sorted(words)


def template_count(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


class Writer:
    def __init__(self, tokenizer: Any, rng: random.Random) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        self.words = vocabulary(tokenizer)

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, n_tokens: int) -> str:
        """Words until the text is n_tokens tokens long (the template's own tokens come on top)."""
        words = [self.rng.choice(self.words) for _ in range(max(1, n_tokens - 1))]
        for _ in range(4):
            text = " ".join(words).capitalize() + "."
            diff = n_tokens - self.tokens(text)
            if diff == 0:
                break
            words = (
                words + [self.rng.choice(self.words) for _ in range(diff)]
                if diff > 0
                else words[: max(1, len(words) + diff)]
            )
        return " ".join(words).capitalize() + "."


def message_count(rng: random.Random, system: bool) -> int:
    """Non-system prompt messages: 1, 3, 5, ... (a prompt ends with the user); with a system prompt the
    median of all prompt messages is 3."""
    turns = 1
    if rng.random() >= 0.3:
        turns = 2
        while rng.random() < 0.55 and 2 * turns + 1 + system <= MAX_MESSAGES:
            turns += 1
    return 2 * turns - 1


def long_pairs(n: int, seed: int = 0, tokenizer: Any = None) -> list[dict[str, Any]]:
    if tokenizer is None:
        from alignment.models import load_tokenizer

        tokenizer = load_tokenizer(MODEL)
    rng = random.Random(seed)
    writer = Writer(tokenizer, rng)
    rows = []
    for i in range(n):
        system = rng.random() < 0.5
        n_messages = message_count(rng, system)
        messages: list[dict[str, str]] = []
        if system:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        # ~6 template tokens a message; long conversations need room for their turns.
        target = draw(rng, *PROMPT, low=0)
        while n_messages > 1 and target < 26 + 5 * n_messages:
            n_messages -= 2
        weights = [rng.random() + 0.3 for _ in range(n_messages)]
        weights[-1] += 0.8  # the last question tends to be the longest
        budget = max(n_messages, target - 6 * n_messages - 20)
        for m in range(n_messages):
            role = "user" if m % 2 == 0 else "assistant"
            messages.append({"role": role, "content": writer.text(round(budget * weights[m] / sum(weights)))})
        # One measurement with the real template, then the last message absorbs the difference.
        last = messages[-1]["content"]
        correction = target - template_count(tokenizer, messages, True)
        messages[-1]["content"] = writer.text(max(1, writer.tokens(last) + correction))
        sides = {}
        for side, profile in (("chosen", CHOSEN), ("rejected", REJECTED)):
            # A completion is its content plus the end-of-turn token and newline.
            sides[side] = [{"role": "assistant", "content": writer.text(draw(rng, *profile, low=3) - 2)}]
        rows.append({"id": f"long-{seed}-{i}", "prompt": messages, **sides})
    return rows


def percentiles(values: list[int]) -> str:
    q = statistics.quantiles(values, n=10)
    return f"p10/p50/p90 = {q[0]:.0f}/{statistics.median(values):.0f}/{q[8]:.0f} (max {max(values)})"


def length_statistics(rows: list[dict[str, Any]], tokenizer: Any) -> dict[str, str]:
    """Measured with the chat template: prompt with generation prompt; completions as what follows it."""

    def count(messages: list[dict[str, str]], generation_prompt: bool) -> int:
        return template_count(tokenizer, messages, generation_prompt)

    prompt = [count(r["prompt"], True) for r in rows]
    chosen = [count(r["prompt"] + r["chosen"], False) - p for r, p in zip(rows, prompt, strict=True)]
    rejected = [count(r["prompt"] + r["rejected"], False) - p for r, p in zip(rows, prompt, strict=True)]
    messages = [len(r["prompt"]) for r in rows]
    systems = {r["prompt"][0]["content"] for r in rows if r["prompt"][0]["role"] == "system"}
    return {
        "pairs": str(len(rows)),
        "prompt tokens": percentiles(prompt),
        "prompt messages": f"median {statistics.median(messages):.0f} (max {max(messages)})",
        "chosen tokens": percentiles(chosen),
        "rejected tokens": percentiles(rejected),
        "system prompts": f"{sum(r['prompt'][0]['role'] == 'system' for r in rows)} pairs, "
        f"{len(systems)} distinct (+ the template's default)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from alignment.data_files import write_jsonl
    from alignment.models import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    rows = long_pairs(args.pairs, args.seed, tokenizer)
    write_jsonl(args.out, rows)
    for key, value in length_statistics(rows, tokenizer).items():
        print(f"{key:16s} {value}")
    print(
        f"target           prompt {PROMPT[:3]} max {PROMPT[3]}, chosen {CHOSEN[:3]}, rejected {REJECTED[:3]}"
    )


if __name__ == "__main__":
    main()
