"""The quickstart's rubric: a written, programmatic judgement of a response (configs/rubric.yaml).

Four things a reader can check by eye, one point each: the house opener, the house closer, a
concise length (points fall off linearly outside the band), no repeated phrase, and staying on the
prompt's topic. The rubric is the ground truth: the simulated annotators follow it imperfectly, and
the aligned model's win rate over the SFT model is measured with it on held-out prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from alignment.config import StrictModel, load_config

RUBRIC_FILE = Path(__file__).resolve().parents[2] / "configs" / "rubric.yaml"
WORD = re.compile(r"[a-z0-9']+")
# words that say nothing about a prompt's topic
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "with",
        "about",
        "from",
        "by",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "what",
        "which",
        "who",
        "whom",
        "why",
        "how",
        "when",
        "where",
        "do",
        "does",
        "did",
        "can",
        "could",
        "should",
        "would",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "i",
        "me",
        "my",
        "you",
        "your",
        "we",
        "our",
        "they",
        "them",
        "their",
        "he",
        "she",
        "his",
        "her",
        "some",
        "any",
        "one",
        "tell",
        "give",
        "write",
        "explain",
        "describe",
        "simple",
        "terms",
        "someone",
        "never",
        "seen",
        "know",
        "thing",
        "things",
        "most",
        "first",
        "good",
        "step",
        "short",
        "note",
        "school",
        "newsletter",
        "interesting",
        "surprising",
        "fact",
        "important",
        "child",
        "name",
        "famous",
        "make",
        "makes",
    ]
)


class LengthBand(StrictModel):
    min_words: int = Field(6, ge=1)
    max_words: int = Field(35, ge=1)


class Rubric(StrictModel):
    name: str = "house-style, concise, on topic"
    opener: str = "Ahoy!"
    closer: str = "Fair winds!"
    length: LengthBand = Field(default_factory=LengthBand)
    repetition_ngram: int = Field(3, ge=2, description="A phrase of this many words used twice = repetition.")
    on_topic_min_overlap: int = Field(1, ge=0, description="Prompt content words the reply must use.")
    tie_tolerance: float = Field(0.05, ge=0, description="Totals closer than this are a tie.")

    def describe(self) -> list[str]:
        """The rubric as the report prints it."""
        band = self.length
        return [
            f"opens with {self.opener!r} (1 point)",
            f"ends with {self.closer!r} (1 point)",
            f"{band.min_words}-{band.max_words} words (1 point; linearly less outside the band)",
            f"no {self.repetition_ngram}-word phrase repeated (1 point)",
            f"uses at least {self.on_topic_min_overlap} of the prompt's content words (1 point)",
            f"the higher total wins; totals within {self.tie_tolerance} are a tie",
        ]


@dataclass(frozen=True)
class Score:
    total: float
    criteria: dict[str, float]
    words: int


def load_rubric(path: str | Path | None = None, overrides: list[str] | None = None) -> Rubric:
    return load_config(Rubric, path or RUBRIC_FILE, overrides)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if len(w) > 2 and w not in STOPWORDS}


def _stem(word: str) -> str:
    # enough to match "volcanoes"/"volcano", "bees"/"bee": compare 5-letter prefixes
    return word[:5]


def score(rubric: Rubric, prompt: str, response: str) -> Score:
    text = response.strip()
    tokens = words(text)
    n = len(tokens)
    band = rubric.length
    if n < band.min_words:
        length = n / band.min_words
    elif n > band.max_words:
        length = max(0.0, 1.0 - (n - band.max_words) / band.max_words)
    else:
        length = 1.0
    k = rubric.repetition_ngram
    grams = [tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)]
    topic = {_stem(w) for w in content_words(prompt)}
    overlap = len(topic & {_stem(w) for w in content_words(text)})
    criteria = {
        "opener": float(text.startswith(rubric.opener)),
        "closer": float(text.endswith(rubric.closer)),
        "length": round(length, 4),
        "no_repetition": float(len(grams) == len(set(grams))),
        "on_topic": float(overlap >= min(rubric.on_topic_min_overlap, len(topic))),
    }
    return Score(total=round(sum(criteria.values()), 4), criteria=criteria, words=n)


def prefer(rubric: Rubric, prompt: str, a: str, b: str) -> str:
    """'a', 'b' or 'tie': which response the rubric judges better."""
    diff = score(rubric, prompt, a).total - score(rubric, prompt, b).total
    if abs(diff) <= rubric.tie_tolerance:
        return "tie"
    return "a" if diff > 0 else "b"
