"""One full turn of the loop on tiny-random: serve -> feedback -> ingest -> DPO -> eval -> promote
-> hot-swap, with requests running throughout; then rollback."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import httpx
import pytest

from serving.config import LoopConfig
from serving.loop import check_gate, notify_server, reward_evaluator, run_once
from serving.registry import ModelRegistry
from tests.serving.conftest import ADMIN_KEY, CLIENT_KEY, add_completions, eventually, feedback

PROMPTS = [f"Tell me about topic {i}." for i in range(10)]


# Two optimizer steps on tiny-random: enough to produce a real adapter, cheap enough for CI.
TINY_TRAINING = {
    "training.max_steps": 2,
    "training.batch_size": 2,
    "training.logging_steps": 1,
    "tracking.report_to": "none",
    "lora.r": 4,
    "data.eval_fraction": 0.0,
}


def length_scorer(prompts: list[str], responses: list[str]) -> list[float]:
    """A programmatic reward: prefers answers near 40 characters."""
    return [-abs(len(r) - 40) for r in responses]


def loop_config(server, tmp_path: Path, **overrides: object) -> LoopConfig:
    return LoopConfig.model_validate(
        {
            "serve": {"model": str(server.settings.model), "store_url": server.store.url},
            "output_dir": str(tmp_path / "runs"),
            "ingest": {"output_dir": str(tmp_path / "data")},
            "trigger": {"min_new_pairs": 6},
            "train_overrides": TINY_TRAINING
            | {"data.near_dup_threshold": None, "dpo.reference_cache_dir": str(tmp_path / "ref-cache")},
            "gate": {"min_win_rate": 0.0, "max_length_ratio": None},
            "eval": {"max_new_tokens": 8},
            "server_url": server.url,
            **overrides,
        }
    )


class Traffic:
    """Clients that keep calling prefloop-current (plain and streamed) and record every outcome."""

    def __init__(self, url: str, clients: int = 3):
        self.url, self.stop = url, threading.Event()
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Still there?"}]
        while not self.stop.is_set():
            try:
                if i % 2:
                    r = client.chat.completions.create(
                        model="prefloop-current", messages=messages, max_tokens=4
                    )
                    self.versions.append(r.system_fingerprint)
                else:
                    chunks = list(
                        client.chat.completions.create(
                            model="prefloop-current", messages=messages, max_tokens=4, stream=True
                        )
                    )
                    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
                    self.versions.append(chunks[0].system_fingerprint)
            except Exception as exc:  # every failure is recorded; the test asserts there are none
                self.failures.append(repr(exc))

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def collect_pairwise_feedback(server, client) -> None:
    for prompt in PROMPTS:
        r = client.chat.completions.create(
            model="prefloop-current", messages=[{"role": "user", "content": prompt}], n=2, max_tokens=12
        )
        a, b = r.choices
        if a.message.content == b.message.content:
            continue
        chosen, rejected = sorted((a, b), key=lambda c: abs(len(c.message.content) - 40))
        body = {"type": "pairwise", "chosen_id": chosen.completion_id, "rejected_id": rejected.completion_id}
        posted = httpx.post(
            f"{server.url}/v1/feedback",
            json=body | {"idempotency_key": uuid.uuid4().hex},
            headers=server.client_headers,
        )
        assert posted.status_code == 201, posted.text


def fingerprint(client) -> str:
    messages = [{"role": "user", "content": "Which version?"}]
    return client.chat.completions.create(
        model="prefloop-current", messages=messages, max_tokens=2
    ).system_fingerprint


@pytest.mark.slow
def test_full_loop_promotes_and_hot_swaps_without_failed_requests(server, client, tmp_path: Path) -> None:
    collect_pairwise_feedback(server, client)
    registry = ModelRegistry(server.store)
    evaluator = reward_evaluator(length_scorer, threads=1)

    not_yet = run_once(loop_config(server, tmp_path, trigger={"min_new_pairs": 1000}), server.store)
    assert not_yet.status == "waiting" and not_yet.new_pairs >= 6 and registry.list() == []

    with Traffic(server.url) as traffic:
        assert eventually(lambda: len(traffic.versions) >= 3, timeout=60)
        # The real DPO trainer, from the base model, on the pairs the server just collected.
        result = run_once(
            loop_config(server, tmp_path), server.store, evaluator=evaluator, admin_key=ADMIN_KEY
        )
        assert eventually(lambda: traffic.versions.count("v0001") >= 3, timeout=60)
    assert traffic.failures == []
    assert result.status == "promoted" and result.swapped and result.version == "v0001"
    assert traffic.versions[0] == "tiny-random" and "v0001" in traffic.versions
    assert fingerprint(client) == "v0001"

    version = registry.get("v0001")
    assert version.parent_id is None and version.base_model == config_model(server)
    assert version.data_version == result.data_version == "v0001"
    assert (Path(version.adapter_path) / "adapter_config.json").is_file()
    assert version.status == "promoted" and version.promoted_at is not None
    assert 0.0 <= version.eval_result["win_rate"] <= 1.0 and version.eval_result["prompts"] == 12
    assert version.eval_result["regression_pass_rate"] >= version.eval_result["wins"] / 12
    assert (tmp_path / "runs" / "v0001" / "eval" / "eval.json").is_file()
    assert version.config["algorithm"] == "dpo"

    # Nothing new since v0001 was trained: the trigger does not fire again.
    assert run_once(loop_config(server, tmp_path), server.store, evaluator=evaluator).status == "waiting"

    # Rollback: v0001's parent is the base model; the server swaps back and unloads v0001.
    assert registry.rollback() is None
    assert notify_server(server.url, ADMIN_KEY) == {"current": None, "previous": "v0001"}
    assert fingerprint(client) == "tiny-random"
    assert eventually(lambda: "v0001" not in server.engine.adapters, timeout=10)
    assert registry.rollback(to="v0001").id == "v0001"
    notify_server(server.url, ADMIN_KEY)
    assert fingerprint(client) == "v0001"


def config_model(server) -> str:
    return str(server.settings.model)


def test_gate_rejects_a_candidate_and_keeps_the_current_model(
    server, client, adapters, tmp_path: Path
) -> None:
    collect_pairwise_feedback(server, client)
    registry = ModelRegistry(server.store)
    before = registry.current()
    config = loop_config(server, tmp_path, gate={"min_win_rate": 1.0, "max_length_ratio": None})
    # Injected trainer: an existing adapter stands in for training; the gate is what is tested here.
    result = run_once(
        config,
        server.store,
        trainer=lambda job: adapters["a2"],
        evaluator=reward_evaluator(lambda prompts, responses: [0.0] * len(responses), threads=1),
        force=True,
        admin_key=ADMIN_KEY,
    )
    assert result.status == "rejected" and result.gate_failures == ["win_rate 0.500 < 1.0"]
    assert registry.get(result.version).status == "rejected"
    assert registry.current() == before
    # The rejected data version is not retrained on every poll: only new feedback triggers again.
    assert run_once(config, server.store, trainer=lambda job: adapters["a2"]).status == "waiting"


def test_gate_checks_each_bound() -> None:
    from serving.config import GateSettings

    gate = GateSettings(min_win_rate=0.6, max_kl=0.5, max_length_ratio=1.5, min_regression_pass_rate=0.9)
    good = {"win_rate": 0.7, "kl": 0.1, "length_ratio": 1.1, "regression_pass_rate": 1.0}
    assert check_gate(good, gate) == []
    bad = {"win_rate": 0.5, "kl": 0.9, "length_ratio": 2.0, "regression_pass_rate": 0.5}
    assert [f.split()[0] for f in check_gate(bad, gate)] == [
        "win_rate",
        "kl",
        "length_ratio",
        "regression_pass_rate",
    ]


@pytest.mark.slow
def test_unpaired_thumbs_train_with_kto(server, client, tmp_path: Path) -> None:
    for i in range(8):
        r = client.chat.completions.create(
            model="prefloop-current", messages=[{"role": "user", "content": f"Thumbs {i}?"}], max_tokens=8
        )
        body = {"type": "thumbs", "completion_id": r.id, "value": "up" if i % 2 else "down"}
        assert (
            httpx.post(f"{server.url}/v1/feedback", json=body, headers=server.client_headers).status_code
            == 201
        )
    config = loop_config(server, tmp_path, algorithm="kto", train_overrides=TINY_TRAINING)
    result = run_once(
        config,
        server.store,
        evaluator=reward_evaluator(lambda prompts, responses: [0.0] * len(responses), threads=1),
        force=True,
        admin_key=ADMIN_KEY,
    )
    assert result.status == "promoted", result
    version = ModelRegistry(server.store).get(result.version)
    assert version.config["algorithm"] == "kto"
    assert (Path(version.adapter_path) / "adapter_config.json").is_file()
    assert fingerprint(client) == result.version


def test_schedule_trigger_retrains_below_the_pair_threshold(store, adapters, tmp_path: Path) -> None:
    a, b = add_completions(store, "scheduled", ["A", "B"])
    feedback(store, "pairwise", a, rejected=b)
    base = {
        "serve": {"model": "tiny-random", "store_url": store.url},
        "output_dir": str(tmp_path / "runs"),
        "ingest": {"output_dir": str(tmp_path / "data")},
        "server_url": None,
    }
    turn = {"trainer": lambda job: adapters["a1"], "evaluator": lambda job: {"win_rate": 1.0}}
    only_pairs = LoopConfig.model_validate(base | {"trigger": {"min_new_pairs": 100}})
    assert run_once(only_pairs, store, **turn).status == "waiting"  # 1 pair < 100, no schedule
    scheduled = LoopConfig.model_validate(base | {"trigger": {"min_new_pairs": 100, "every_minutes": 1e-6}})
    assert run_once(scheduled, store, **turn).status == "promoted"  # the schedule fired on new data
    assert run_once(scheduled, store, **turn).status == "waiting"  # nothing new since then


# One loop turn in a child process that is SIGKILLed at a chosen point: mid-retrain, or after
# training but before the evaluation was recorded.
KILLED_TURN = """
import os, signal, sys
from pathlib import Path
from serving.config import LoopConfig
from serving.feedback_store import FeedbackStore
from serving.loop import run_once

config = LoopConfig.model_validate_json(Path(sys.argv[1]).read_text())
adapter, where = sys.argv[2], sys.argv[3]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def trainer(job):
    job.output_dir.mkdir(parents=True, exist_ok=True)
    (job.output_dir / "checkpoint-1").mkdir()  # what a real run has written when it dies
    return die() if where == "train" else Path(adapter)

run_once(config, FeedbackStore(config.serve.store_url), trainer=trainer, evaluator=lambda job: die())
"""


@pytest.mark.parametrize("where", ["train", "eval"])
def test_a_loop_killed_mid_turn_is_finished_by_the_next_run(store, adapters, tmp_path: Path, where) -> None:
    import subprocess
    import sys

    a, b = add_completions(store, "killed turn", ["A", "B"])
    feedback(store, "pairwise", a, rejected=b)
    config = LoopConfig.model_validate(
        {
            "serve": {"model": "tiny-random", "store_url": store.url},
            "output_dir": str(tmp_path / "runs"),
            "ingest": {"output_dir": str(tmp_path / "data")},
            "trigger": {"min_new_pairs": 1},
            "server_url": None,
        }
    )
    (tmp_path / "loop.json").write_text(config.model_dump_json())
    child = subprocess.run(
        [sys.executable, "-c", KILLED_TURN, str(tmp_path / "loop.json"), str(adapters["a1"]), where],
        capture_output=True,
        text=True,
    )
    assert child.returncode == -9, child.stderr
    registry = ModelRegistry(store)
    (row,) = registry.list()
    assert row.eval_result is None and (row.adapter_path is None) == (where == "train")

    trained: list[str] = []

    def trainer(job) -> Path:
        trained.append(job.output_dir.name)
        return adapters["a1"]

    result = run_once(config, store, trainer=trainer, evaluator=lambda job: {"win_rate": 1.0})
    # the same version id and data version an uninterrupted turn would have produced
    assert (result.status, result.version, result.data_version) == ("promoted", "v0001", "v0001")
    assert trained == (["v0001"] if where == "train" else [])  # a finished adapter is not retrained
    assert [v.id for v in registry.list()] == ["v0001"]
    assert registry.current().adapter_path == str(adapters["a1"])
    assert (
        run_once(config, store, trainer=trainer, evaluator=lambda job: {"win_rate": 1.0}).status == "waiting"
    )
