"""`compare_models` / `prefloop eval` and `prefloop reward score` on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignment.preference_data import write_preference_rows
from reward.evaluate import ModelSpec, SamplingSettings, compare_models
from reward.scorer import RewardScorer

PROMPTS = [[{"role": "user", "content": f"Say something {i}"}] for i in range(4)]
SAMPLING = SamplingSettings(max_new_tokens=8, temperature=1.0, batch_size=4)


@pytest.fixture(scope="module")
def random_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with non-zero B, so the policy really differs from its reference."""
    import torch
    from peft import LoraConfig, get_peft_model

    from alignment.models import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(load_causal_lm(tiny_model), config)
    model.save_pretrained(out)
    load_tokenizer(tiny_model).save_pretrained(out)
    return out


def test_identical_models_tie_everywhere(tiny_model: Path, trained: tuple) -> None:
    scorer = RewardScorer.from_pretrained(trained[0])
    spec = ModelSpec(model=str(tiny_model))
    result = compare_models(spec, spec, scorer, PROMPTS, SAMPLING)
    assert (result["wins"], result["ties"], result["losses"]) == (0, 4, 0)
    assert result["win_rate"] == 0.5
    assert result["candidate"]["kl_to_reference"] == 0.0


def test_adapter_candidate_has_positive_kl_and_implicit_reward_accuracy(
    tiny_model: Path, trained: tuple, random_adapter: Path
) -> None:
    scorer = RewardScorer.from_pretrained(trained[0])
    pairs = [
        {
            "prompt": p,
            "chosen": [{"role": "assistant", "content": "red ahoy"}],
            "rejected": [{"role": "assistant", "content": "blue"}],
        }
        for p in PROMPTS
    ]
    result = compare_models(
        ModelSpec(adapter=random_adapter), ModelSpec(model=str(tiny_model)), scorer, PROMPTS, SAMPLING, pairs
    )
    cand = result["candidate"]
    assert result["wins"] + result["ties"] + result["losses"] == 4
    assert (
        cand["kl_to_reference"] > 0.01
    )  # KL of a sampled policy to its reference is non-negative in expectation
    assert 0.0 <= cand["implicit_reward_accuracy"] <= 1.0
    assert "implicit_reward_accuracy" not in result["baseline"]
    assert 1 <= cand["mean_length"] <= SAMPLING.max_new_tokens
    assert len(cand["rewards"]) == 4


def test_eval_cli_writes_json_and_plot(
    tiny_model: Path, trained: tuple, random_adapter: Path, tmp_path: Path
) -> None:
    from serving.cli import app

    prompts = tmp_path / "prompts.jsonl"
    write_preference_rows(prompts, [{"prompt": p, "chosen": "a", "rejected": "b"} for p in PROMPTS])
    args = [
        "eval", "--candidate", str(random_adapter), "--reward-model", str(trained[0]),
        "--set", f"baseline.model={tiny_model}", "--set", f"prompts={prompts}", "--set", "eval_fraction=null",
        "--set", "sampling.max_new_tokens=4", "--set", f"output_dir={tmp_path / 'eval'}",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["prompts"] == 4 and 0 <= report["win_rate"] <= 1
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 1000
    assert "win rate" in result.output


def test_reward_score_cli_single_pair_file_and_bad_input(trained: tuple, tmp_path: Path) -> None:
    from serving.cli import app

    runner = CliRunner()
    one = runner.invoke(
        app, ["reward", "score", str(trained[0]), "--prompt", "Say 1", "--response", "red ahoy"]
    )
    assert one.exit_code == 0, one.output
    float(one.stdout.strip().splitlines()[-1])

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Say 1", "chosen": "big sad ahoy", "rejected": "big sad"}) + "\n")
    out = tmp_path / "scored.jsonl"
    scored = runner.invoke(
        app, ["reward", "score", str(trained[0]), "--input", str(rows), "--output", str(out)]
    )
    assert scored.exit_code == 0, scored.output
    row = json.loads(out.read_text())
    assert row["reward_chosen"] > row["reward_rejected"]

    rows.write_text(json.dumps({"prompt": "Say 1"}) + "\n")
    bad = runner.invoke(app, ["reward", "score", str(trained[0]), "--input", str(rows)])
    assert bad.exit_code == 2
    assert "rows.jsonl:1: row needs 'response'" in bad.output


def test_explicit_reference_is_used_for_kl(tiny_model: Path, trained: tuple, random_adapter: Path) -> None:
    scorer = RewardScorer.from_pretrained(trained[0])
    candidate = ModelSpec(adapter=random_adapter)
    result = compare_models(
        candidate, ModelSpec(model=str(tiny_model)), scorer, PROMPTS, SAMPLING, reference=candidate
    )
    assert result["candidate"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # its own reference
    assert result["baseline"]["kl_to_reference"] != 0.0  # the base measured against the adapter model
