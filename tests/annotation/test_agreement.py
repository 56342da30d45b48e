"""Agreement statistics against values computed by hand."""

from __future__ import annotations

import pytest

from annotation.agreement import agreement_report, cohen_kappa, krippendorff_alpha, majority


def test_cohen_kappa_matches_hand_computation() -> None:
    # p_o = 4/6; both annotators use a and b three times each -> p_e = (3*3 + 3*3) / 36 = 0.5
    one = ["a", "a", "b", "b", "a", "b"]
    two = ["a", "b", "b", "b", "a", "a"]
    assert cohen_kappa(one, two) == pytest.approx((4 / 6 - 0.5) / 0.5)
    assert cohen_kappa(one, one) == pytest.approx(1.0)
    # systematic disagreement is worse than chance
    assert cohen_kappa(["a", "b", "a", "b"], ["b", "a", "b", "a"]) == pytest.approx(-1.0)


def test_cohen_kappa_rejects_unpaired_labels() -> None:
    with pytest.raises(ValueError, match="equally long"):
        cohen_kappa(["a"], ["a", "b"])


def test_krippendorff_alpha_matches_hand_computation() -> None:
    # units (a,a), (a,b), (b,b): coincidences o_aa=2, o_ab=o_ba=1, o_bb=2; n_a=n_b=3, n=6
    # D_o = 2/6, D_e = 2*3*3 / (6*5) = 0.6 -> alpha = 1 - (1/3)/0.6 = 4/9
    votes = {"u1": {"x": "a", "y": "a"}, "u2": {"x": "a", "y": "b"}, "u3": {"x": "b", "y": "b"}}
    assert krippendorff_alpha(votes) == pytest.approx(4 / 9)
    # a unit with a single vote is not pairable and does not count
    assert krippendorff_alpha({**votes, "u4": {"x": "a"}}) == pytest.approx(4 / 9)
    assert krippendorff_alpha({"u1": {"x": "a"}}) is None


def test_majority_needs_a_unique_top_label() -> None:
    assert majority(["a", "a", "b"]) == "a"
    assert majority(["a", "b"]) is None
    assert majority([]) is None


def test_report_flags_the_annotator_who_disagrees_with_the_others() -> None:
    # leave-one-out: each annotator is compared with the majority of the *other* three
    votes = {f"r{i}": {"ann": "a", "bob": "a", "cy": "a", "eve": "b"} for i in range(4)}
    report = agreement_report(votes, threshold=0.5)
    assert report.with_consensus == {"ann": 1.0, "bob": 1.0, "cy": 1.0, "eve": 0.0}
    assert report.flagged == ["eve"]
    assert report.pairwise_kappa[("ann", "bob")] == pytest.approx(1.0)
    assert report.as_dict()["flagged_annotators"] == ["eve"]
