"""Win rates with a 95% confidence interval: the one function every judge's win rate goes through.

Per prompt the candidate scores 1 (win), 1/2 (tie) or 0 (loss); the win rate is their mean and the
interval a percentile bootstrap over prompts (the unit that was sampled). The bootstrap handles
ties-as-half, which a binomial interval (Wilson) does not; it is seeded, so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def outcomes(candidate: Sequence[float], baseline: Sequence[float], tie_tolerance: float) -> list[float]:
    """Per prompt: 1 win, 0.5 tie, 0 loss of candidate over baseline, by score difference."""
    diff = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    return np.where(diff > tie_tolerance, 1.0, np.where(diff < -tie_tolerance, 0.0, 0.5)).tolist()


def win_rate_with_ci(
    points: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """{"win_rate", "ci95": [low, high], "wins", "ties", "losses", "n"} of per-prompt points in [0, 1]."""
    data = np.asarray(points, dtype=float)
    n = len(data)
    if n == 0:
        return {"n": 0, "wins": 0, "ties": 0, "losses": 0, "win_rate": float("nan"), "ci95": [0.0, 1.0]}
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    wins, losses = int((data == 1).sum()), int((data == 0).sum())
    return {
        "n": n,
        "wins": wins,
        "ties": n - wins - losses,
        "losses": losses,
        "win_rate": float(data.mean()),
        "ci95": [float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))],
    }


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927): well-behaved near 0, 1 and for small n.

    For decisive comparisons only (ties dropped), where each prompt is a plain success or failure.
    """
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
