"""Win rates with 95% intervals: Wilson for a proportion, a paired bootstrap for ties-count-half."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927): well-behaved near 0, 1 and for small n."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def outcomes(candidate: Sequence[float], baseline: Sequence[float], tolerance: float) -> np.ndarray:
    """Per prompt: 1 win, 0.5 tie, 0 loss of candidate over baseline."""
    diff = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    return np.where(diff > tolerance, 1.0, np.where(diff < -tolerance, 0.0, 0.5))


def bootstrap_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean over prompts (the unit that was sampled)."""
    data = np.asarray(values, dtype=float)
    if len(data) == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def win_rate(
    candidate: Sequence[float],
    baseline: Sequence[float],
    tolerance: float,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float | int | list[float]]:
    """Ties-count-half win rate with a bootstrap interval, and the decisive-only rate with Wilson's."""
    o = outcomes(candidate, baseline, tolerance)
    wins, losses = int((o == 1).sum()), int((o == 0).sum())
    ties = len(o) - wins - losses
    low, high = bootstrap_interval(o, resamples, seed)
    d_low, d_high = wilson_interval(wins, wins + losses)
    return {
        "prompts": len(o),
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": float(o.mean()) if len(o) else 0.5,
        "ci95": [low, high],
        "decisive_win_rate": wins / (wins + losses) if wins + losses else 0.5,
        "decisive_ci95_wilson": [d_low, d_high],
    }
