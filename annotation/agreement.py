"""Inter-annotator agreement on categorical votes.

votes: {record_id: {annotator: label}}. Cohen's kappa compares two annotators on the records they
both labelled; Krippendorff's alpha (nominal, via the `krippendorff` package) summarises everyone
at once and tolerates missing votes, which overlap-based assignment always produces.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import krippendorff
import numpy as np

Votes = dict[str, dict[str, str]]


def cohen_kappa(labels_1: list[str], labels_2: list[str]) -> float:
    """kappa = (p_o - p_e) / (1 - p_e): observed agreement corrected for chance agreement p_e,
    where p_e uses each annotator's own label frequencies."""
    n = len(labels_1)
    if n == 0 or n != len(labels_2):
        raise ValueError("cohen_kappa needs two equally long, non-empty label lists")
    p_o = sum(a == b for a, b in zip(labels_1, labels_2, strict=True)) / n
    freq_1, freq_2 = Counter(labels_1), Counter(labels_2)
    p_e = sum(freq_1[k] * freq_2[k] for k in freq_1) / n**2
    if p_e == 1.0:  # both annotators used one and the same label: agreement is perfect but uninformative
        return 1.0
    return (p_o - p_e) / (1.0 - p_e)


def krippendorff_alpha(votes: Votes) -> float | None:
    """Nominal alpha over records with at least two votes; None when there is nothing pairable."""
    items = [v for v in votes.values() if len(v) >= 2]
    categories = sorted({label for v in items for label in v.values()})
    if not items or len(categories) < 2:
        return None if not items else 1.0
    counts = np.zeros((len(items), len(categories)))
    for i, record_votes in enumerate(items):
        for label in record_votes.values():
            counts[i, categories.index(label)] += 1
    return float(krippendorff.alpha(value_counts=counts, level_of_measurement="nominal"))


def majority(labels: list[str]) -> str | None:
    """The most frequent label, or None when the top count is shared (no consensus)."""
    if not labels:
        return None
    ranked = Counter(labels).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


@dataclass
class AgreementReport:
    alpha: float | None
    pairwise_kappa: dict[tuple[str, str], float]
    with_consensus: dict[str, float]  # annotator -> share of votes matching the others' majority
    flagged: list[str]

    def as_dict(self) -> dict:
        return {
            "krippendorff_alpha": self.alpha,
            "pairwise_cohen_kappa": {f"{a}|{b}": k for (a, b), k in self.pairwise_kappa.items()},
            "agreement_with_consensus": self.with_consensus,
            "flagged_annotators": self.flagged,
        }


def agreement_report(votes: Votes, threshold: float, min_shared: int = 2) -> AgreementReport:
    annotators = sorted({a for v in votes.values() for a in v})
    pairwise = {}
    for a, b in itertools.combinations(annotators, 2):
        shared = [v for v in votes.values() if a in v and b in v]
        if len(shared) >= min_shared:
            pairwise[(a, b)] = cohen_kappa([v[a] for v in shared], [v[b] for v in shared])
    # leave-one-out consensus: an annotator is compared with the majority of the *other* votes,
    # otherwise their own vote would count towards the consensus they are judged against
    hits: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for record_votes in votes.values():
        for annotator, label in record_votes.items():
            others = majority([lab for who, lab in record_votes.items() if who != annotator])
            if others is not None:
                seen[annotator] += 1
                hits[annotator] += label == others
    with_consensus = {a: hits[a] / seen[a] for a in annotators if seen[a]}
    flagged = sorted(a for a, score in with_consensus.items() if score < threshold)
    return AgreementReport(krippendorff_alpha(votes), pairwise, with_consensus, flagged)
