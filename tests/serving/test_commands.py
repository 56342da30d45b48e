"""`prefloop feedback|loop|registry` from the command line, on a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from serving import feedback_store as fs
from serving.registry import ModelRegistry


@pytest.fixture
def setup(tmp_path: Path):
    """A loop config file and a store holding one pairwise pick."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    config = tmp_path / "loop.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "serve": {"model": "tiny-random", "store_url": url},
                "ingest": {"output_dir": str(tmp_path / "data")},
                "trigger": {"min_new_pairs": 5},
                "server_url": None,
            }
        )
    )
    store = fs.FeedbackStore(url)
    messages = [{"role": "user", "content": "hi"}]
    rows = [
        fs.Completion(
            id=f"r-{i}", response_id="r", choice_index=i, prompt_hash=fs.prompt_hash(messages), prompt=messages,
            response=text, model="m", model_version="m", params={}, finish_reason="stop", prompt_tokens=1,
            completion_tokens=1, latency_ms=1.0,
        )
        for i, text in enumerate(["good", "bad"])
    ]  # fmt: skip
    with store.session() as s:
        fs.log_completions(s, rows)
        fs.add_feedback(s, fs.FeedbackInput("pairwise", "r-0", rejected_id="r-1"))
    yield config, store
    store.close()


def run(*args: str) -> tuple[int, str]:
    from serving.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_ingest_then_status_shows_pairs_waiting_for_the_trigger(setup) -> None:
    config, _ = setup
    code, out = run("feedback", "ingest", "--config", str(config))
    assert code == 0, out
    assert "v0001" in out and (config.parent / "data" / "v0001" / "preference.jsonl").is_file()
    code, out = run("loop", "status", "--config", str(config))
    assert code == 0, out
    assert "pairs_not_trained_on" in out and "base (tiny-random)" in out
    # 1 pair < min_new_pairs 5: the loop waits instead of training.
    code, out = run("loop", "run", "--config", str(config))
    assert code == 0 and "waiting" in out


def test_registry_promote_list_and_rollback(setup) -> None:
    config, store = setup
    registry = ModelRegistry(store)
    registry.register("tiny-random", "/adapters/v1", parent_id=None)
    code, out = run("registry", "promote", "v0001", "--config", str(config))
    assert code == 0 and "current: v0001" in out
    code, out = run("registry", "list", "--json", "--config", str(config))
    listing = json.loads(out)
    assert listing["current"] == "v0001" and listing["versions"][0]["adapter_path"] == "/adapters/v1"
    code, out = run("registry", "rollback", "--config", str(config))
    assert code == 0 and "current: base" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("registry", "rollback"), "nothing to roll back"),
        (("registry", "promote", "v0042"), "unknown model version 'v0042'"),
        (("loop", "status", "--set", "trigger.min_new_pairs=0"), "trigger.min_new_pairs"),
        (("loop", "status", "--set", "nonsense=1"), "nonsense: unknown key"),
    ],
)
def test_bad_input_exits_2_with_the_reason(setup, args: tuple[str, ...], message: str) -> None:
    config, _ = setup
    code, out = run(*args, "--config", str(config))
    assert code == 2, out
    assert message in " ".join(out.split())
