"""`annotate pull` publishes a version folder whole or not at all, and only when the votes changed.

The write path (`pull.write_version`) without a server: a real SIGKILL half-way through writing,
then a re-run, must give the same `v1` as an uninterrupted pull; the same votes again, no `v2`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from annotation.pull import Aggregation, write_version


def aggregation(winner: str = "a") -> Aggregation:
    prompt = [{"role": "user", "content": "Which is better?"}]
    row = {
        "id": "p1",
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "good" if winner == "a" else "bad"}],
        "rejected": [{"role": "assistant", "content": "bad" if winner == "a" else "good"}],
        "source": "argilla:tests/pull",
        "annotator_agreement": 1.0,
    }
    return Aggregation(rows=[row], audit=[{"id": "r1", "votes": {"ann1": winner, "ann2": winner}}])


def manifest(pulled_at: str = "2026-01-01T00:00:00Z") -> dict:
    return {"source": "argilla:tests/pull", "pulled_at": pulled_at, "pairs": 1}


# Killed after preferences.jsonl is staged, while votes.jsonl is being written.
KILLED_PULL = """
import builtins, json, os, signal, sys
from pathlib import Path
import annotation.pull as pull
sys.path.insert(0, sys.argv[2])
from test_pull_versions import aggregation, manifest

real_open = Path.open
def open_then_die(self, *args, **kwargs):
    if self.name == "votes.jsonl":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_open(self, *args, **kwargs)
Path.open = open_then_die
pull.write_version(Path(sys.argv[1]), aggregation(), manifest())
"""


def _contents(folder: Path) -> dict[str, object]:
    files: dict[str, object] = {p.name: p.read_text() for p in folder.iterdir()}
    stable = json.loads(str(files.pop("manifest.json")))
    stable.pop("pulled_at")
    return files | {"manifest": stable}


def test_a_killed_pull_leaves_no_version_and_the_rerun_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    child = subprocess.run(
        [sys.executable, "-c", KILLED_PULL, str(killed), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
    )
    assert child.returncode == -9, child.stderr
    assert not [p for p in killed.iterdir() if p.name.startswith("v")]  # no partial v1 to count
    assert [p for p in killed.iterdir() if p.name.startswith(".staging-v1")]

    folder, unchanged = write_version(killed, aggregation(), manifest())
    assert folder.name == "v1" and not unchanged
    assert _contents(folder) == _contents(write_version(clean, aggregation(), manifest())[0])
    assert sorted(p.name for p in killed.iterdir()) == [".lock", "v1"]  # the leftover is gone


def test_the_same_votes_give_the_same_version_and_new_votes_the_next(tmp_path: Path) -> None:
    first, unchanged = write_version(tmp_path, aggregation(), manifest())
    assert first.name == "v1" and not unchanged
    again, unchanged = write_version(tmp_path, aggregation(), manifest("2026-02-02T00:00:00Z"))
    assert again == first and unchanged  # a later pull of the same votes: no v2
    changed, unchanged = write_version(tmp_path, aggregation("b"), manifest())
    assert changed.name == "v2" and not unchanged
    assert (
        json.loads((changed / "manifest.json").read_text())["content_hash"]
        != json.loads((first / "manifest.json").read_text())["content_hash"]
    )


def test_a_version_folder_left_half_written_in_place_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "preferences.jsonl").write_text('{"half')  # an old in-place pull, killed
    folder, _ = write_version(tmp_path, aggregation(), manifest())
    assert folder.name == "v1" and (folder / "manifest.json").is_file()
    assert (folder / "votes.jsonl").read_text().count("\n") == 1
