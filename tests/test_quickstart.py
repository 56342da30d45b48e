"""`prefloop quickstart --small` end to end on SmolLM2: every artifact the loop promises, the
direction of the DPO-over-SFT rubric win rate, and the HTML report rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.argilla]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    root = tmp_path_factory.mktemp("quickstart") / "run"
    cmd = [
        sys.executable,
        "-c",
        "from serving.cli import app; app()",
        "quickstart",
        "--small",
        "--output-dir",
        str(root),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def check_artifacts(root: Path) -> dict:
    """Every stage's output, read back from disk (shared with the browser test)."""
    state = _json(root / "state.json")
    for stage in (
        "model",
        "sft",
        "sample",
        "annotate",
        "preferences",
        "reward",
        "align",
        "eval",
        "serve",
        "report",
    ):
        assert stage in state["stages"], f"stage {stage} has no record"
        assert state["stages"][stage]["wall_s"] >= 0

    for adapter in ("sft", "dpo", "reward"):
        assert (root / adapter / "adapter_config.json").is_file()
        assert (root / adapter / "adapter_model.safetensors").stat().st_size > 0

    # the versioned pulled dataset with agreement figures, from three distinct annotators' votes
    version_dir = Path(_json(root / "preferences" / "latest.json")["version_dir"])
    assert version_dir.name.startswith("v") and version_dir.parent.parent == root / "preferences"
    manifest = _json(version_dir / "manifest.json")
    assert manifest["pairs"] > 0
    assert set(manifest["agreement"]["agreement_with_consensus"]) == {
        "sim-noisy",
        "sim-position",
        "sim-shorter",
    }
    assert manifest["agreement"]["pairwise_cohen_kappa"]
    rows = [json.loads(line) for line in (version_dir / "preferences.jsonl").read_text().splitlines()]
    assert len(rows) == manifest["pairs"] and all(r["annotator_agreement"] > 0 for r in rows)

    reward_eval = _json(root / "reward" / "reward_eval.json")
    assert 0.0 <= reward_eval["accuracy"] <= 1.0 and reward_eval["pairs"] > 0

    evaluation = _json(root / "eval" / "eval.json")
    for key in ("rubric_win_rate", "reward_model_win_rate"):
        low, high = evaluation[key]["ci95"]
        assert 0.0 <= low <= evaluation[key]["win_rate"] <= high <= 1.0
    assert evaluation["kl_to_sft"]["aligned"] >= 0 and evaluation["mean_length_tokens"]["aligned"] > 0

    # feedback rows of every kind in the store, and the loop's gate decision in the registry
    from serving.feedback_store import Feedback, FeedbackStore
    from serving.registry import ModelRegistry

    store = FeedbackStore(f"sqlite:///{root / 'serve' / 'feedback.db'}")
    with store.session() as session:
        feedback = session.query(Feedback).all()
        kinds = {f.kind for f in feedback}
        corrections = sum(1 for f in feedback if f.corrected_response)
    assert {"thumbs", "rating", "pairwise"} <= kinds, kinds
    assert corrections > 0
    versions = ModelRegistry(store).list()
    assert len(versions) >= 3 and versions[1].parent_id == versions[0].id
    loop_version = versions[-1]
    assert loop_version.status in ("promoted", "rejected", "candidate")
    assert "gate_failures" in (loop_version.eval_result or {})
    serve = _json(root / "serve" / "result.json")
    assert serve["loop"]["status"] in ("promoted", "rejected")
    if serve["loop"]["status"] == "promoted":
        assert serve["served_after"] == loop_version.id  # hot-swapped
    assert (root / "report" / "report.html").is_file() and (root / "report" / "summary.md").is_file()
    return evaluation


def test_quickstart_small_writes_every_artifact(run_dir: Path) -> None:
    evaluation = check_artifacts(run_dir)
    # the direction the loop exists for: the aligned model beats SFT by the rubric on held-out prompts
    assert evaluation["rubric_win_rate"]["win_rate"] > 0.5, evaluation["rubric_win_rate"]


def test_argilla_holds_votes_from_three_distinct_users(run_dir: Path) -> None:
    """Restart the run's own workspace and read the submitted responses back from Argilla."""
    from annotation import workspace
    from annotation.config import ServerSettings
    from annotation.preference_dataset import PREFERENCE

    settings = ServerSettings(
        home=str(run_dir / "argilla"), port=workspace.free_port(), startup_timeout_s=300
    )
    connection = workspace.up(settings)
    try:
        client = connection.client()
        dataset = client.datasets("quickstart", workspace="prefloop")
        users = {str(u.id): u.username for u in client.users}
        voters = set()
        records = 0
        for record in dataset.records(with_responses=True):
            records += 1
            for response in record.responses[PREFERENCE] or []:
                if getattr(response.status, "value", response.status) == "submitted":
                    voters.add(users[str(response.user_id)])
        assert records > 0
        assert voters == {"sim-noisy", "sim-position", "sim-shorter"}
    finally:
        workspace.down(settings)
    assert not workspace.status(settings)["processes"]


def test_rerun_skips_every_valid_stage(run_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-c",
        "from serving.cli import app; app()",
        "quickstart",
        "--small",
        "--output-dir",
        str(run_dir),
        "--stages",
        "sft,sample,report",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = _json(run_dir / "state.json")
    assert state["stages"]["sft"]["skipped"] and state["stages"]["sample"]["skipped"]
    assert not state["stages"]["report"]["skipped"]


def test_report_renders_in_headless_chromium(run_dir: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium")
    report = run_dir / "report" / "report.html"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(report.resolve().as_uri())
            widths = page.eval_on_selector_all(
                "img.plot", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)"
            )
            assert len(widths) >= 6 and all(w > 0 for w in widths), widths
            assert page.locator("table#summary tr").count() >= 6
            assert "rubric win rate" in page.inner_text("table#summary")
        finally:
            browser.close()
