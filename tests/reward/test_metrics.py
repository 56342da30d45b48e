"""Reward metrics on hand-made rewards whose right answers are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reward.metrics import (
    expected_calibration_error,
    length_buckets,
    pairwise_accuracy,
    reward_metrics,
    write_reward_metrics,
)


def test_pairwise_accuracy_counts_ties_as_half() -> None:
    assert pairwise_accuracy(np.array([2.0, 1.0, 0.0, 5.0]), np.array([1.0, 1.0, 3.0, 0.0])) == 0.625


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident() -> None:
    # margin log(3) -> p = 0.75; with 3 of 4 pairs right at that confidence, calibration is perfect.
    margin = np.log(3.0)
    rc = np.array([margin, margin, margin, -margin])
    assert expected_calibration_error(rc, np.zeros(4))["ece"] == pytest.approx(0.0, abs=1e-9)
    # margin 10 -> confidence ~1.0, but only half the pairs are right: ECE ~0.5.
    overconfident = np.array([10.0, -10.0, 10.0, -10.0])
    assert expected_calibration_error(overconfident, np.zeros(4))["ece"] == pytest.approx(0.5, abs=1e-3)


def test_length_buckets_expose_a_length_biased_model() -> None:
    # A model that just rewards length: right when chosen is longer, wrong when it is shorter.
    diff = np.array([-30, -20, -10, -5, 5, 10, 20, 30], dtype=float)
    buckets = length_buckets(diff, np.zeros(8), diff, n_buckets=2)
    assert [b["accuracy"] for b in buckets] == [0.0, 1.0]
    assert sum(b["n"] for b in buckets) == 8


def test_reward_metrics_report_and_plot(tmp_path: Path) -> None:
    metrics = reward_metrics([2.0, 1.0, 0.5], [0.0, 1.5, 0.0], [10, 20, 30], [12, 8, 30])
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["mean_margin"] == pytest.approx((2.0 - 0.5 + 0.5) / 3)
    json_path, png_path = write_reward_metrics(metrics, tmp_path)
    assert json_path.is_file() and png_path.stat().st_size > 1000
