"""The quickstart's win-rate summary: reward.win_rate's bootstrap (ties count half) and Wilson (decisive only)."""

from __future__ import annotations

from collections.abc import Sequence

from reward.win_rate import outcomes, wilson_interval, win_rate_with_ci


def win_rate(
    candidate: Sequence[float],
    baseline: Sequence[float],
    tolerance: float,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float | int | list[float]]:
    """Ties-count-half win rate with a bootstrap interval, and the decisive-only rate with Wilson's."""
    summary = win_rate_with_ci(outcomes(candidate, baseline, tolerance), resamples=resamples, seed=seed)
    wins, losses = summary["wins"], summary["losses"]
    decisive = wins + losses
    return {
        "prompts": summary["n"],
        "wins": wins,
        "ties": summary["ties"],
        "losses": losses,
        "win_rate": summary["win_rate"] if summary["n"] else 0.5,
        "ci95": summary["ci95"],
        "decisive_win_rate": wins / decisive if decisive else 0.5,
        "decisive_ci95_wilson": list(wilson_interval(wins, decisive)),
    }
