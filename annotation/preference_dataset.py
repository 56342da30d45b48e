"""The preference dataset, declared once: Argilla settings, record ids, and the A/B position mapping.

Annotators see the conversation and two responses, A and B, in an order randomised per record
(position bias is real: people and judges over-pick the first slot). The order is derived from
the record id, so re-pushing a pair yields the identical record, and it is stored in metadata
(`swapped`) so `pull` maps a vote for "A" back to the pair's own first/second response.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import argilla as rg

from alignment.messages import Message
from annotation.config import DatasetSettings

PREFERENCE = "preference"
LABELS = {"a": "Response A", "b": "Response B", "tie": "Tie", "both_bad": "Both bad"}
NO_PAIR_LABELS = ("tie", "both_bad")  # votes that say "no usable preference"
REWARD_AGENT = "reward-model"


@dataclass(frozen=True)
class CandidatePair:
    """Two responses to one conversation, in the order they were produced (no preference yet)."""

    prompt: list[Message]
    first: str
    second: str
    source: str = "generated"
    first_reward: float | None = None
    second_reward: float | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def reward_margin(self) -> float | None:
        if self.first_reward is None or self.second_reward is None:
            return None
        return abs(self.first_reward - self.second_reward)


def record_id(pair: CandidatePair) -> str:
    """Content hash of the conversation and the *unordered* pair: (x, y) and (y, x) are one record."""
    payload = json.dumps([pair.prompt, sorted([pair.first, pair.second])], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def is_swapped(rid: str) -> bool:
    """Whether response A shows the pair's *second* response: a fair coin seeded by the id."""
    return int(rid[-1], 16) % 2 == 1


def unmap_vote(label: str, swapped: bool) -> str:
    """A vote on the screen ("a"/"b"/...) -> which of the pair's responses it picked ("first"/"second"/...)."""
    if label not in ("a", "b"):
        return label
    shown_first = "a" if not swapped else "b"
    return "first" if label == shown_first else "second"


def build_settings(settings: DatasetSettings) -> rg.Settings:
    questions: list = [
        rg.LabelQuestion(name=PREFERENCE, title="Which response is better?", labels=LABELS, required=True)
    ]
    if settings.ratings:
        questions += [
            rg.RatingQuestion(
                name=f"rating_{s}",
                title=f"Rate response {s.upper()} (1-5)",
                values=[1, 2, 3, 4, 5],
                required=False,
            )
            for s in ("a", "b")
        ]
    if settings.rationale:
        questions.append(rg.TextQuestion(name="rationale", title="Why? (optional)", required=False))
    return rg.Settings(
        guidelines=settings.guidelines,
        fields=[
            rg.ChatField(name="conversation", title="Conversation"),
            # Markdown stays on: Argilla sanitizes it, while its plain-text field puts the text in the
            # page as HTML (an `<img onerror>` in a response runs). tests/annotation/test_browser.py
            rg.TextField(name="response_a", title="Response A", use_markdown=True),
            rg.TextField(name="response_b", title="Response B", use_markdown=True),
        ],
        questions=questions,
        metadata=[
            rg.TermsMetadataProperty(name="swapped", options=["yes", "no"], visible_for_annotators=False),
            rg.TermsMetadataProperty(name="source", visible_for_annotators=False),
            rg.FloatMetadataProperty(name="reward_margin", visible_for_annotators=False),
            rg.IntegerMetadataProperty(name="uncertainty_rank", visible_for_annotators=True),
        ],
        distribution=rg.TaskDistribution(min_submitted=settings.min_submitted),
    )


def to_record(pair: CandidatePair, uncertainty_rank: int) -> rg.Record:
    rid = record_id(pair)
    swapped = is_swapped(rid)
    a, b = (pair.second, pair.first) if swapped else (pair.first, pair.second)
    metadata: dict[str, object] = {
        "swapped": "yes" if swapped else "no",
        "source": pair.source,
        "uncertainty_rank": uncertainty_rank,
    }
    suggestions = []
    if pair.reward_margin is not None:
        reward_a, reward_b = (
            (pair.second_reward, pair.first_reward) if swapped else (pair.first_reward, pair.second_reward)
        )
        metadata["reward_margin"] = pair.reward_margin
        # Bradley-Terry: P(A preferred) = sigmoid(r_A - r_B); the suggestion carries that confidence
        p_a = 1.0 / (1.0 + math.exp(-(reward_a - reward_b)))
        label, confidence = ("a", p_a) if p_a >= 0.5 else ("b", 1.0 - p_a)
        suggestions.append(
            rg.Suggestion(question_name=PREFERENCE, value=label, score=confidence, agent=REWARD_AGENT)
        )
    return rg.Record(
        id=rid,
        fields={"conversation": pair.prompt, "response_a": a, "response_b": b},
        metadata=metadata,
        suggestions=suggestions,
    )
