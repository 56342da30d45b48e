"""The loop's gate on LLM-judge, interval and perplexity rules; the registry keeps the figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.config import GateSettings, LoopConfig
from serving.loop import EvalJob, check_gate, reward_evaluator, run_once
from serving.registry import ModelRegistry
from tests.serving.conftest import CLIENT_KEY, RunningServer, add_completions, feedback


def test_gate_rules_for_judge_interval_and_perplexity() -> None:
    gate = GateSettings(
        min_win_rate=0.0,
        max_length_ratio=None,
        min_judge_win_rate=0.6,
        max_perplexity_increase=0.1,
        min_win_rate_lower_bound=0.4,
    )
    good = {
        "win_rate": 0.7,
        "judge_win_rate": 0.65,
        "perplexity_increase": 0.05,
        "win_rate_lower_bound": 0.45,
    }
    assert check_gate(good, gate) == []
    bad = {"win_rate": 0.7, "judge_win_rate": 0.55, "perplexity_increase": 0.2, "win_rate_lower_bound": 0.3}
    assert check_gate(bad, gate) == [
        "win_rate_lower_bound 0.300 < 0.4",
        "judge_win_rate 0.550 < 0.6",
        "perplexity_increase 0.200 > 0.1",
    ]
    # No judge verdict at all (None) is not a pass.
    assert check_gate({"win_rate": 1.0}, gate) == [
        "win_rate_lower_bound missing < 0.4",
        "judge_win_rate missing < 0.6",
        "perplexity_increase missing > 0.1",
    ]


def test_a_judge_or_perplexity_rule_needs_its_inputs_at_load_time() -> None:
    with pytest.raises(ValueError, match=r"gate\.min_judge_win_rate needs eval\.judge"):
        LoopConfig.model_validate({"gate": {"min_judge_win_rate": 0.5}})
    with pytest.raises(ValueError, match=r"gate\.max_perplexity_increase needs eval\.sft_heldout"):
        LoopConfig.model_validate({"gate": {"max_perplexity_increase": 0.1}})


def loop_config(store, tmp_path: Path, gate: dict) -> LoopConfig:
    return LoopConfig.model_validate(
        {
            "serve": {"model": "tiny-random", "store_url": store.url},
            "output_dir": str(tmp_path / "runs"),
            "ingest": {"output_dir": str(tmp_path / "data")},
            "trigger": {"min_new_pairs": 1},
            "eval": {
                "judge": {"base_url": "http://127.0.0.1:9/v1", "model": "judge", "api_key_env": None},
                "sft_heldout": str(tmp_path / "heldout.jsonl"),
            },
            "gate": {"min_win_rate": 0.0, "max_length_ratio": None, **gate},
            "server_url": None,
        }
    )


@pytest.mark.parametrize(
    ("gate", "metrics", "failure"),
    [
        ({"min_judge_win_rate": 0.5}, {"judge_win_rate": 0.25}, "judge_win_rate 0.250 < 0.5"),
        ({"max_perplexity_increase": 0.05}, {"perplexity_increase": 0.3}, "perplexity_increase 0.300 > 0.05"),
    ],
    ids=["judge", "perplexity"],
)
def test_gate_refuses_a_candidate_and_the_registry_keeps_why(
    store, adapters, tmp_path: Path, gate: dict, metrics: dict, failure: str
) -> None:
    a, b = add_completions(store, "gated", ["A", "B"])
    feedback(store, "pairwise", a, rejected=b)
    evaluation = {"win_rate": 0.9, "judge_win_rate": 0.8, "perplexity_increase": 0.0, **metrics}
    config = loop_config(store, tmp_path, gate)
    result = run_once(config, store, trainer=lambda job: adapters["a1"], evaluator=lambda job: evaluation)
    assert result.status == "rejected" and result.gate_failures == [failure]
    version = ModelRegistry(store).get(result.version)
    assert version.status == "rejected" and ModelRegistry(store).current() is None
    key = next(iter(metrics))
    assert version.eval_result[key] == metrics[key] and version.eval_result["gate_failures"] == [failure]
    assert version.config["gate"][next(iter(gate))] == gate[next(iter(gate))]


def test_reward_evaluator_measures_judge_and_perplexity_for_the_gate(
    server: RunningServer, adapters: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real parts: tiny-random candidate/current adapters, perplexity, and `prefloop serve` as the judge."""
    from serving.config import EvalSettings

    monkeypatch.setenv("PREFLOOP_JUDGE_API_KEY", CLIENT_KEY)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
        )
        + "\n"
    )
    settings = EvalSettings(
        max_new_tokens=4,
        judge={
            "base_url": f"{server.url}/v1",
            "model": "tiny-random",
            "max_tokens": 4,
            "max_parse_retries": 0,
            "cache_dir": str(tmp_path / "cache"),
        },
        sft_heldout=heldout,
    )
    prompts = [[{"role": "user", "content": "Name a fruit."}], [{"role": "user", "content": "Name a tree."}]]
    job = EvalJob("tiny-random", adapters["a1"], adapters["a2"], prompts, settings, tmp_path / "eval")
    metrics = reward_evaluator(lambda p, r: [float(len(x)) for x in r], threads=1)(job)
    assert metrics["perplexity_candidate"] > 1 and metrics["perplexity_current"] > 1
    expected = metrics["perplexity_candidate"] / metrics["perplexity_current"] - 1
    assert metrics["perplexity_increase"] == pytest.approx(expected)
    # The random-weights judge answers but never gives a verdict: no judge win rate, and the rule fails.
    assert metrics["judge_parse_failures"] == 4 and metrics["judge_decided"] == 0
    assert metrics["judge_win_rate"] is None
    assert len(metrics["win_rate_ci95"]) == 2 and "reward" in metrics["error_analysis"]
    gate = GateSettings(min_win_rate=0.0, max_length_ratio=None, min_judge_win_rate=0.5)
    assert check_gate(metrics, gate) == ["judge_win_rate missing < 0.5"]
    json.dumps(metrics, allow_nan=False)  # what the registry stores is valid JSON (PostgreSQL too)
