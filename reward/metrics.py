"""Reward-model evaluation metrics over held-out pairs: accuracy, margin, length bias, calibration.

Inputs are the rewards of each pair's chosen and rejected response and their lengths in tokens.
The model's preference probability is the Bradley-Terry one, p = sigmoid(r_chosen - r_rejected).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def pairwise_accuracy(r_chosen: np.ndarray, r_rejected: np.ndarray) -> float:
    """Fraction of pairs ranked right; a tie counts half (it is a coin flip, not a win)."""
    return float(np.mean((r_chosen > r_rejected) + 0.5 * (r_chosen == r_rejected)))


def expected_calibration_error(
    r_chosen: np.ndarray, r_rejected: np.ndarray, n_bins: int = 10
) -> dict[str, Any]:
    """ECE of the Bradley-Terry probability, with the usual top-label binning.

    The prediction is the side with p > 0.5 and its confidence max(p, 1 - p) in [0.5, 1];
    ECE = sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins.
    """
    p = 1.0 / (1.0 + np.exp(-(r_chosen - r_rejected)))
    confidence = np.maximum(p, 1.0 - p)
    correct = (p > 0.5).astype(float)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    bins = []
    ece = 0.0
    for b in range(n_bins):
        mask = index == b
        if not mask.any():
            continue
        acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
        ece += mask.mean() * abs(acc - conf)
        bins.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": int(mask.sum()),
                "accuracy": acc,
                "confidence": conf,
            }
        )
    return {"ece": float(ece), "bins": bins}


def length_buckets(
    r_chosen: np.ndarray, r_rejected: np.ndarray, length_diff: np.ndarray, n_buckets: int = 4
) -> list[dict[str, Any]]:
    """Accuracy per quantile bucket of len(chosen) - len(rejected): a length-biased model is only right
    where the chosen answer is the longer one."""
    if len(length_diff) == 0:
        return []
    edges = np.unique(np.quantile(length_diff, np.linspace(0, 1, n_buckets + 1)))
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    index = np.clip(np.searchsorted(edges, length_diff, side="right") - 1, 0, len(edges) - 2)
    out = []
    for b in range(len(edges) - 1):
        mask = index == b
        if mask.any():
            out.append(
                {
                    "length_diff": f"[{edges[b]:g}, {edges[b + 1]:g}]",
                    "n": int(mask.sum()),
                    "accuracy": pairwise_accuracy(r_chosen[mask], r_rejected[mask]),
                }
            )
    return out


def reward_metrics(
    r_chosen: list[float],
    r_rejected: list[float],
    len_chosen: list[int],
    len_rejected: list[int],
    n_bins: int = 10,
    n_buckets: int = 4,
) -> dict[str, Any]:
    rc, rr = np.asarray(r_chosen, dtype=float), np.asarray(r_rejected, dtype=float)
    lc, lr = np.asarray(len_chosen, dtype=float), np.asarray(len_rejected, dtype=float)
    calibration = expected_calibration_error(rc, rr, n_bins)
    rewards, lengths = np.concatenate([rc, rr]), np.concatenate([lc, lr])
    # Length bias in one number: how much of the reward a response's length alone explains.
    corr = float(np.corrcoef(rewards, lengths)[0, 1]) if rewards.std() > 0 and lengths.std() > 0 else 0.0
    return {
        "pairs": len(rc),
        "accuracy": pairwise_accuracy(rc, rr),
        "mean_margin": float(np.mean(rc - rr)),
        "mean_reward_chosen": float(rc.mean()),
        "mean_reward_rejected": float(rr.mean()),
        "ece": calibration["ece"],
        "reward_length_correlation": corr,
        "length_buckets": length_buckets(rc, rr, lc - lr, n_buckets),
        "calibration_bins": calibration["bins"],
    }


def plot_reward_metrics(metrics: dict[str, Any], path: Path) -> Path:
    """Two panels: accuracy by length-difference bucket, and the reliability diagram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    buckets = metrics["length_buckets"]
    left.bar([b["length_diff"] for b in buckets], [b["accuracy"] for b in buckets], color="tab:blue")
    left.axhline(
        metrics["accuracy"], color="black", linestyle="--", label=f"overall {metrics['accuracy']:.2f}"
    )
    left.set(ylim=(0, 1), xlabel="len(chosen) - len(rejected), tokens", ylabel="pairwise accuracy")
    left.set_title("Accuracy by length difference")
    left.legend()
    left.tick_params(axis="x", labelrotation=20)
    bins = metrics["calibration_bins"]
    right.plot([0.5, 1], [0.5, 1], color="grey", linestyle=":", label="perfect")
    right.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label="model")
    right.set(xlim=(0.5, 1), ylim=(0, 1), xlabel="confidence max(p, 1-p)", ylabel="accuracy")
    right.set_title(f"Calibration (ECE {metrics['ece']:.3f})")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reward_metrics(
    metrics: dict[str, Any], out_dir: Path, name: str = "reward_eval"
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(metrics, indent=2))
    return json_path, plot_reward_metrics(metrics, out_dir / f"{name}.png")
