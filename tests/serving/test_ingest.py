"""Feedback -> preference pairs and KTO rows: the rules, dedup, conflicts and versioning."""

from __future__ import annotations

import json
from pathlib import Path

from alignment.preference_data import load_preference_rows
from serving.ingest import ingest
from tests.serving.conftest import add_completions, feedback


def pairs_of(path: Path) -> set[tuple[str, str, str, str]]:
    rows = load_preference_rows(path)
    return {
        (r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["source"])
        for r in rows
    }


def test_every_feedback_kind_becomes_the_expected_rows(store, tmp_path: Path) -> None:
    a, b = add_completions(store, "pick", ["A", "B"])
    feedback(store, "pairwise", b, rejected=a)
    feedback(store, "pairwise", b, rejected=a)  # duplicate vote: one pair
    r1, r2, r3 = add_completions(store, "rate", ["good", "okay", "bad"])
    feedback(store, "rating", r1, 5)
    feedback(store, "rating", r2, 4)  # 1 star from r1: below min gap 2
    feedback(store, "rating", r3, 1)
    (c,) = add_completions(store, "fix", ["wrong"])
    feedback(store, "thumbs", c, -1, corrected_response="right")
    up, down = add_completions(store, "thumbs", ["liked", "disliked"])
    feedback(store, "thumbs", up, 1)
    feedback(store, "thumbs", down, -1)
    (lonely,) = add_completions(store, "alone", ["solo"])
    feedback(store, "thumbs", lonely, 1)

    data = ingest(store, tmp_path / "data", min_rating_gap=2)
    assert pairs_of(data.preference_file) == {
        ("pick", "B", "A", "pairwise"),
        ("rate", "good", "bad", "rating"),
        ("rate", "okay", "bad", "rating"),
        ("fix", "right", "wrong", "correction"),
        ("thumbs", "liked", "disliked", "thumbs"),
    }
    kto = [json.loads(line) for line in data.kto_file.read_text().splitlines()]
    # "wrong" was corrected into a pair and is still an unpaired thumbs-down; "solo" an unpaired up.
    assert {(r["completion"][0]["content"], r["label"]) for r in kto} == {("solo", True), ("wrong", False)}
    assert (data.version, data.pairs, data.new_pairs) == ("v0001", 5, 5)


def test_contradicting_picks_keep_the_majority_and_drop_ties(store, tmp_path: Path) -> None:
    a, b = add_completions(store, "majority", ["A", "B"])
    for chosen, rejected in [(a, b), (a, b), (b, a)]:
        feedback(store, "pairwise", chosen, rejected=rejected)
    c, d = add_completions(store, "tie", ["C", "D"])
    feedback(store, "pairwise", c, rejected=d)
    feedback(store, "pairwise", d, rejected=c)
    data = ingest(store, tmp_path / "data")
    assert pairs_of(data.preference_file) == {("majority", "A", "B", "pairwise")}


def test_versions_are_new_only_when_the_data_changes(store, tmp_path: Path) -> None:
    a, b = add_completions(store, "v", ["A", "B"])
    feedback(store, "pairwise", a, rejected=b)
    first = ingest(store, tmp_path / "data")
    again = ingest(store, tmp_path / "data")
    assert again.unchanged and again.version == first.version == "v0001"
    c, d = add_completions(store, "w", ["C", "D"])
    feedback(store, "rating", c, 5)
    feedback(store, "rating", d, 2)
    second = ingest(store, tmp_path / "data")
    assert (second.version, second.pairs, second.new_pairs) == ("v0002", 2, 1)
    manifest = json.loads((second.path / "manifest.json").read_text())
    assert manifest["parent"] == "v0001" and manifest["sources"] == {"pairwise": 1, "rating": 1}
    assert (tmp_path / "data" / "v0001" / "preference.jsonl").is_file()  # older versions stay for lineage


# A real SIGKILL at the precise point: the ingest has staged preference.jsonl and is writing kto.jsonl.
KILLED_INGEST = """
import os, signal, sys
import serving.ingest as ingest_module
from serving.feedback_store import FeedbackStore

def die(path, rows):
    os.kill(os.getpid(), signal.SIGKILL)

ingest_module.write_jsonl = die
ingest_module.ingest(FeedbackStore(sys.argv[1]), sys.argv[2])
"""


def _files(version_dir: Path) -> dict[str, object]:
    out: dict[str, object] = {p.name: p.read_text() for p in sorted(version_dir.iterdir())}
    manifest = json.loads(str(out.pop("manifest.json")))
    manifest.pop("created_at")
    return out | {"manifest": manifest}


def test_a_killed_ingest_leaves_no_version_and_the_rerun_matches_an_uninterrupted_one(
    store, tmp_path: Path
) -> None:
    import subprocess
    import sys

    a, b = add_completions(store, "kill", ["A", "B"])
    feedback(store, "pairwise", a, rejected=b)
    (c,) = add_completions(store, "kto", ["C"])
    feedback(store, "thumbs", c, 1)
    killed, clean = tmp_path / "killed", tmp_path / "clean"

    run = subprocess.run(
        [sys.executable, "-c", KILLED_INGEST, store.url, str(killed)], capture_output=True, text=True
    )
    assert run.returncode == -9, run.stderr
    leftovers = [p.name for p in killed.iterdir()]
    assert not any(name.startswith("v") for name in leftovers)  # nothing that counts as a version
    assert any(name.startswith(".staging-v0001") for name in leftovers)  # the half-written one

    rerun = ingest(store, killed)
    assert rerun.version == "v0001" and not rerun.unchanged
    assert _files(rerun.path) == _files(ingest(store, clean).path)
    assert sorted(p.name for p in killed.iterdir()) == [".lock", "v0001"]  # leftovers removed
    assert ingest(store, killed).unchanged  # and re-running again is a no-op


def test_an_incomplete_version_written_in_place_is_replaced_not_counted(store, tmp_path: Path) -> None:
    a, b = add_completions(store, "legacy", ["A", "B"])
    feedback(store, "pairwise", a, rejected=b)
    (tmp_path / "data" / "v0001").mkdir(parents=True)
    (tmp_path / "data" / "v0001" / "preference.jsonl").write_text('{"half": ')  # no manifest
    data = ingest(store, tmp_path / "data")
    assert data.version == "v0001" and data.pairs == 1
    assert pairs_of(data.preference_file) == {("legacy", "A", "B", "pairwise")}
