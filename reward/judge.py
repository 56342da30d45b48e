"""An LLM judge: any OpenAI-compatible chat endpoint (a hosted model, vLLM, or `prefloop serve`).

    judge = LLMJudge(JudgeSettings(base_url="http://127.0.0.1:8000/v1", model="prefloop-current"))
    result = judge.compare(prompts, candidate_answers, baseline_answers)
    result.win_rate, result.position_bias, result.parse_failures

Pairwise judging asks twice, once with each answer in position A (MT-Bench's remedy for position
bias, Zheng et al. 2023, arxiv 2306.05685): a pair's score is the mean of the two verdicts mapped back
to the candidate (win 1, tie 1/2, loss 0), so a judge that always says "A" scores every pair a tie.
How often the judge picked position A is reported as its measured bias. A reply without a verdict is
retried up to `max_parse_retries` times and counted; every answered request is cached on disk by
(judge, prompt, answers), so re-running an evaluation sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import Field, model_validator

from alignment.config import ConfigError, StrictModel
from alignment.messages import Message

Messages = list[Message]
Verdict = Literal["A", "B", "tie"]

DEFAULT_RUBRIC = (
    "Judge which answer is more helpful, correct, and clear for the user's request. "
    "Do not let the order of the answers or their length influence you."
)
PAIRWISE_TEMPLATE = (
    "{rubric}\n\n[User request]\n{question}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}\n\n"
    'Reply with your verdict only: "[[A]]" if A is better, "[[B]]" if B is better, "[[C]]" for a tie.'
)
RATING_TEMPLATE = (
    "{rubric}\n\n[User request]\n{question}\n\n[Answer]\n{answer}\n\n"
    'Rate the answer from 1 (useless) to 10 (excellent). Reply with the rating only, as "[[N]]".'
)
_PAIRWISE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
# Small judges often answer "A is better" or "B)" instead of the asked format: a bare leading letter counts.
_LEADING_LETTER = re.compile(r"^\W*(?i:answer\s*)?\(?([ABC])\)?(?![\w'])")
_RATING = re.compile(r"\[\[\s*(10|[1-9])(?:\.\d+)?\s*\]\]")


class JudgeError(ConfigError):
    """The judge endpoint refused or could not be reached (after retries). A ConfigError, because the
    fix is in the judge settings (URL, model, key), so every CLI reports it as one: exit 2."""


class JudgeSettings(StrictModel):
    base_url: str = Field(..., description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., description="Model name the endpoint serves.")
    api_key_env: str | None = Field(
        "PREFLOOP_JUDGE_API_KEY", description="Environment variable holding the key; null = no key."
    )
    rubric: str = Field(DEFAULT_RUBRIC, description="What the judge is told to look for.")
    rubric_file: Path | None = Field(None, description="Read the rubric from this text file instead.")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(16, ge=1, description="The verdict is short; a cap keeps a chatty judge cheap.")
    max_parse_retries: int = Field(2, ge=0, description="Re-asks when a reply has no verdict.")
    max_http_retries: int = Field(2, ge=0, description="Re-sends after a connection error or a 5xx.")
    timeout_s: float = Field(120, gt=0)
    concurrency: int = Field(4, ge=1, description="Requests in flight (a server batches them).")
    cache_dir: Path | None = Field(
        Path("runs/judge-cache"), description="On-disk verdict cache; null disables it."
    )

    @model_validator(mode="after")
    def _rubric_from_file(self) -> JudgeSettings:
        if self.rubric_file is not None:
            if not self.rubric_file.is_file():
                raise ValueError(f"rubric_file {self.rubric_file} not found")
            object.__setattr__(self, "rubric", self.rubric_file.read_text(encoding="utf-8").strip())
        return self


def parse_pairwise(text: str) -> Verdict | None:
    """The last `[[A]]`/`[[B]]`/`[[C]]` in a reply (models sometimes restate the format first), else a
    reply that starts with the letter ("A is better", "(B)")."""
    found = _PAIRWISE.findall(text)
    if found:
        letter = found[-1]
    elif match := _LEADING_LETTER.match(text):
        letter = match.group(1)
    else:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[letter]  # type: ignore[return-value]


def parse_rating(text: str) -> float | None:
    found = _RATING.findall(text)
    return float(found[-1]) if found else None


@dataclass
class PairwiseResult:
    """Per pair: the debiased candidate score (1 win, 1/2 tie, 0 loss; None = no verdict) and both verdicts."""

    scores: list[float | None]
    verdicts: list[tuple[Verdict | None, Verdict | None]]  # (candidate as A, candidate as B)
    parse_failures: int = 0  # replies without a verdict, retries included
    unresolved: int = 0  # requests that never gave a verdict
    requests: int = 0  # sent to the endpoint (cache hits are not requests)
    cache_hits: int = 0
    raw: list[tuple[str, str]] = field(default_factory=list)

    @property
    def decided(self) -> list[float]:
        return [s for s in self.scores if s is not None]

    @property
    def win_rate(self) -> float:
        return sum(self.decided) / len(self.decided) if self.decided else float("nan")

    @property
    def first_order_win_rate(self) -> float:
        """The win rate a single-order judge (candidate always shown first) would have reported."""
        points = [{"A": 1.0, "tie": 0.5, "B": 0.0}[a] for a, _ in self.verdicts if a is not None]
        return sum(points) / len(points) if points else float("nan")

    @property
    def position_bias(self) -> float:
        """Share of decisive verdicts that picked position A (0.5 = no position preference)."""
        picks = [v for pair in self.verdicts for v in pair if v in ("A", "B")]
        return sum(v == "A" for v in picks) / len(picks) if picks else float("nan")

    @property
    def consistency(self) -> float:
        """Share of pairs whose two orders agree (after mapping back to the candidate)."""
        both = [(a, b) for a, b in self.verdicts if a is not None and b is not None]
        flip = {"A": "B", "B": "A", "tie": "tie"}
        agree = [a == flip[b] for a, b in both]
        return sum(agree) / len(agree) if agree else float("nan")

    def summary(self) -> dict[str, Any]:
        decided = self.decided
        return {
            "pairs": len(self.scores),
            "decided": len(decided),
            # A pair split between the orders (win + tie = 3/4) leans one way: counted by its side of 1/2.
            "wins": sum(s > 0.5 for s in decided),
            "ties": sum(s == 0.5 for s in decided),
            "losses": sum(s < 0.5 for s in decided),
            "win_rate": self.win_rate,
            "first_order_win_rate": self.first_order_win_rate,
            "position_bias": self.position_bias,
            "consistency": self.consistency,
            "parse_failures": self.parse_failures,
            "unresolved": self.unresolved,
            "requests": self.requests,
            "cache_hits": self.cache_hits,
        }


class LLMJudge:
    def __init__(self, settings: JudgeSettings, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        headers = {}
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if key is None:
                raise ConfigError(
                    f"judge.api_key_env: environment variable {settings.api_key_env} is not set "
                    "(set it, or judge.api_key_env=null for an endpoint without keys)"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(
            base_url=settings.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=settings.timeout_s,
            transport=transport,
        )
        self._lock = threading.Lock()
        self.requests = 0
        self.cache_hits = 0
        self.parse_failures = 0

    # --- one question ----------------------------------------------------------------------------

    def _cache_path(self, kind: str, content: str) -> Path | None:
        if self.settings.cache_dir is None:
            return None
        # The judge's identity is everything that can change its answer.
        identity = [self.settings.base_url, self.settings.model, self.settings.temperature, kind, content]
        key = hashlib.sha256(json.dumps(identity).encode("utf-8", "surrogatepass")).hexdigest()
        return self.settings.cache_dir / key[:2] / f"{key}.json"

    def _post(self, content: str) -> str:
        body = {
            "model": self.settings.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
        }
        for attempt in range(self.settings.max_http_retries + 1):
            try:
                with self._lock:
                    self.requests += 1
                response = self.client.post("chat/completions", json=body)
            except httpx.HTTPError as exc:
                error = f"{self.settings.base_url}: {exc}"
            else:
                if response.status_code < 400:
                    try:
                        return str(response.json()["choices"][0]["message"]["content"] or "")
                    except (ValueError, KeyError, IndexError, TypeError):
                        error = (
                            f"{self.settings.base_url}: not an OpenAI chat completion: {response.text[:200]}"
                        )
                elif response.status_code < 500 and response.status_code != 429:
                    raise JudgeError(
                        f"judge {self.settings.base_url} refused the request "
                        f"({response.status_code}): {response.text[:300]}"
                    )
                else:
                    error = f"{self.settings.base_url}: HTTP {response.status_code}"
            if attempt < self.settings.max_http_retries:
                time.sleep(min(2**attempt * 0.5, 8))  # back off before the next try, not after the last
        raise JudgeError(f"judge unreachable after {self.settings.max_http_retries + 1} tries: {error}")

    def ask(self, kind: str, content: str, parse: Any) -> tuple[Any, str, bool]:
        """(parsed verdict or None, raw reply, from cache): asks until parsed or out of retries."""
        path = self._cache_path(kind, content)
        if path is not None and path.is_file():
            cached = json.loads(path.read_text(encoding="utf-8"))
            with self._lock:
                self.cache_hits += 1
            return cached["verdict"], cached["raw"], True
        raw = ""
        verdict = None
        for _ in range(self.settings.max_parse_retries + 1):
            raw = self._post(content)
            verdict = parse(raw)
            if verdict is not None:
                break
            with self._lock:
                self.parse_failures += 1
        if path is not None and verdict is not None:
            # Only verdicts are cached: an unparsed reply is asked again next time.
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"verdict": verdict, "raw": raw}), encoding="utf-8")
            tmp.replace(path)
        return verdict, raw, False

    # --- many questions --------------------------------------------------------------------------

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        with ThreadPoolExecutor(self.settings.concurrency) as pool:
            return list(pool.map(fn, items))

    def compare(
        self, prompts: Sequence[Messages | str], candidate: Sequence[str], baseline: Sequence[str]
    ) -> PairwiseResult:
        """Candidate vs baseline answers to the same prompts, each pair judged in both orders."""
        before = (self.requests, self.cache_hits, self.parse_failures)
        questions = [_question(p) for p in prompts]
        jobs = []
        for q, cand, base in zip(questions, candidate, baseline, strict=True):
            for a, b in ((cand, base), (base, cand)):
                jobs.append(
                    PAIRWISE_TEMPLATE.format(rubric=self.settings.rubric, question=q, answer_a=a, answer_b=b)
                )
        answers = self._map(lambda c: self.ask("pairwise", c, parse_pairwise), jobs)
        verdicts: list[tuple[Verdict | None, Verdict | None]] = []
        scores: list[float | None] = []
        raw: list[tuple[str, str]] = []
        for i in range(0, len(answers), 2):
            first, second = answers[i][0], answers[i + 1][0]
            verdicts.append((first, second))
            raw.append((answers[i][1], answers[i + 1][1]))
            points = []
            if first is not None:
                points.append({"A": 1.0, "tie": 0.5, "B": 0.0}[first])
            if second is not None:
                points.append({"B": 1.0, "tie": 0.5, "A": 0.0}[second])
            # Both orders or no score: one order alone would bring its position bias back.
            scores.append(sum(points) / 2 if len(points) == 2 else None)
        return PairwiseResult(
            scores,
            verdicts,
            parse_failures=self.parse_failures - before[2],
            unresolved=sum(a[0] is None for a in answers),
            requests=self.requests - before[0],
            cache_hits=self.cache_hits - before[1],
            raw=raw,
        )

    def rate(self, prompts: Sequence[Messages | str], responses: Sequence[str]) -> list[float | None]:
        """A 1-10 rating per answer (single-answer grading); None where the judge gave no rating."""
        jobs = [
            RATING_TEMPLATE.format(rubric=self.settings.rubric, question=_question(p), answer=r)
            for p, r in zip(prompts, responses, strict=True)
        ]
        return [v for v, _, _ in self._map(lambda c: self.ask("rating", c, parse_rating), jobs)]

    def scorer(self, prompts: list[Any], responses: list[str]) -> list[float]:
        """`rate` as a scoring callable (curation): no rating scores 0, below the 1-10 scale."""
        return [0.0 if r is None else r for r in self.rate(prompts, responses)]

    def close(self) -> None:
        self.client.close()


def _question(prompt: Messages | str) -> str:
    """The conversation so far as the judge reads it: earlier turns labelled, the last request plain."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
