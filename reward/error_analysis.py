"""Error analysis of a comparison: the prompts where the candidate lost most, by each judge,
beside the baseline's answer."""

from __future__ import annotations

from typing import Any

import numpy as np

from alignment.messages import Message

Messages = list[Message]


def _prompt_text(prompt: Messages) -> str:
    return prompt[-1]["content"] if prompt else ""


def reward_losses(
    prompts: list[Messages], cand: dict[str, Any], base: dict[str, Any], tie_tolerance: float, top_k: int
) -> list[dict[str, Any]]:
    """The prompts the candidate lost by the largest reward margin, with both answers."""
    margins = np.array(cand["rewards"]) - np.array(base["rewards"])
    order = [int(i) for i in np.argsort(margins, kind="stable") if margins[i] < -tie_tolerance]
    return [
        {
            "prompt": _prompt_text(prompts[i]),
            "candidate": cand["responses"][i],
            "baseline": base["responses"][i],
            "candidate_reward": cand["rewards"][i],
            "baseline_reward": base["rewards"][i],
            "margin": float(margins[i]),
        }
        for i in order[:top_k]
    ]


def judge_losses(
    prompts: list[Messages],
    cand: dict[str, Any],
    base: dict[str, Any],
    scores: list[float | None],
    verdicts: list[tuple[Any, Any]],
    top_k: int,
) -> list[dict[str, Any]]:
    """The prompts the judge gave to the baseline, lost in both orders first."""
    lost = sorted((s, i) for i, s in enumerate(scores) if s is not None and s < 0.5)
    return [
        {
            "prompt": _prompt_text(prompts[i]),
            "candidate": cand["responses"][i],
            "baseline": base["responses"][i],
            "judge_score": s,
            "verdicts": {"candidate_first": verdicts[i][0], "baseline_first": verdicts[i][1]},
        }
        for s, i in lost[:top_k]
    ]
