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
    # KL from samples is non-negative only in expectation: over 4 prompts x 8 tokens its standard
    # error (0.04) is twice the mean (0.017 +- 0.008 over 30 seeds, measured), so estimate it on 64.
    prompts = [[{"role": "user", "content": f"Say something {i}"}] for i in range(64)]
    result = compare_models(
        ModelSpec(adapter=random_adapter), ModelSpec(model=str(tiny_model)), scorer, prompts, SAMPLING, pairs
    )
    cand = result["candidate"]
    assert result["wins"] + result["ties"] + result["losses"] == 64
    assert cand["kl_to_reference"] > 0.0
    assert 0.0 <= cand["implicit_reward_accuracy"] <= 1.0
    assert "implicit_reward_accuracy" not in result["baseline"]
    assert 1 <= cand["mean_length"] <= SAMPLING.max_new_tokens
    assert len(cand["rewards"]) == 64


def test_eval_cli_writes_json_and_plot(
    tiny_model: Path, trained: tuple, random_adapter: Path, tmp_path: Path
) -> None:
    from serving.cli import app

    prompts = tmp_path / "prompts.jsonl"
    write_preference_rows(prompts, [{"prompt": p, "chosen": "a", "rejected": "b"} for p in PROMPTS])
    args = [
        "eval", "--candidate", str(random_adapter), "--reward-model", str(trained[0]),
        "--set", f"baseline.model={tiny_model}", "--set", f"prompts={prompts}", "--set", "eval_fraction=null",
        "--set", "sampling.max_new_tokens=4", "--set", f"output_dir={tmp_path / 'eval'}", "--threads", "1",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["prompts"] == 4 and 0 <= report["win_rate"] <= 1
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 1000
    assert "win rate" in result.output
    assert "| reward model |" in (tmp_path / "eval" / "eval.md").read_text()
    assert len(report["win_rate_ci95"]) == 2 and "reward" in report["error_analysis"]


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


def test_perplexity_matches_a_hand_computed_value(tiny_model: Path) -> None:
    import math

    import torch

    from alignment.models import load_causal_lm, load_tokenizer
    from reward.policy_metrics import perplexity

    tokenizer, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model).eval()
    conversations = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, sailor."}],
        [
            {"role": "user", "content": "Count to three, please"},
            {"role": "assistant", "content": "One two three"},
        ],
    ]
    # By hand: one unpadded forward pass per conversation, -log p of each assistant token summed.
    nll, tokens = 0.0, 0
    for conv in conversations:
        text = tokenizer.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = tokenizer(tokenizer.apply_chat_template(conv, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        for t in range(n_prompt, len(ids)):
            nll -= torch.log_softmax(logits[t - 1], dim=-1)[ids[t]].item()
            tokens += 1
    result = perplexity(model, tokenizer, conversations, batch_size=2)  # padded batch of both
    assert result["heldout_tokens"] == tokens
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert result["perplexity"] > 1000  # random weights over a 49k vocabulary: close to uniform


def test_reference_metrics_and_win_rate_intervals() -> None:
    from reward.policy_metrics import reference_metrics
    from reward.win_rate import outcomes, win_rate_with_ci

    same = reference_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["rouge_l"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(100.0)
    assert same["chrf"] == pytest.approx(100.0)
    other = reference_metrics(["a dog ran far", "x"], ["the cat sat on the mat", None])
    assert other["rouge_l"] == 0.0 and other["references"] == 1 and other["chrf"] < 20
    assert reference_metrics(["a"], [None]) == {}

    points = outcomes([1, 2, 3, 4], [0, 2, 5, 0], tie_tolerance=1e-3)
    assert points == [1.0, 0.5, 0.0, 1.0]
    wr = win_rate_with_ci(points * 10)
    assert wr["win_rate"] == pytest.approx(0.625) and (wr["wins"], wr["ties"], wr["losses"]) == (20, 10, 10)
    low, high = wr["ci95"]
    assert 0.45 < low < 0.625 < high < 0.8
    narrow = win_rate_with_ci(points * 100)["ci95"]
    assert narrow[1] - narrow[0] < high - low  # more prompts, tighter interval


def test_judge_perplexity_references_and_error_analysis_in_one_comparison(
    tiny_model: Path, trained: tuple, random_adapter: Path, tmp_path: Path
) -> None:
    import httpx

    from reward.eval_report import report_markdown
    from reward.judge import JudgeSettings, LLMJudge

    def prefers_baseline_when_shown_second(request: httpx.Request) -> httpx.Response:
        # Always says B: in both orders that is one win each way, so every pair is a tie after debiasing.
        return httpx.Response(200, json={"choices": [{"message": {"content": "[[B]]"}}]})

    judge = LLMJudge(
        JudgeSettings(
            base_url="http://judge.test/v1", model="fake", api_key_env=None, cache_dir=tmp_path / "c"
        ),
        transport=httpx.MockTransport(prefers_baseline_when_shown_second),
    )
    scorer = RewardScorer.from_pretrained(trained[0])
    heldout = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]]
    references = ["red ahoy", None, "blue", "green ahoy"]
    result = compare_models(
        ModelSpec(adapter=random_adapter), ModelSpec(model=str(tiny_model)), scorer, PROMPTS, SAMPLING,
        judge=judge, heldout=heldout, references=references, top_k=2,
    )  # fmt: skip
    assert result["judge"]["win_rate"] == 0.5 and result["judge"]["ties"] == 4
    assert result["judge"]["position_bias"] == 0.0 and result["judge"]["requests"] == 8
    assert len(result["win_rate_ci95"]) == 2 and len(result["judge"]["win_rate_ci95"]) == 2
    cand, base = result["candidate"], result["baseline"]
    assert cand["perplexity"] > 1 and base["perplexity"] > 1
    assert result["perplexity_increase"] == pytest.approx(cand["perplexity"] / base["perplexity"] - 1)
    assert cand["references"] == 3 and 0 <= cand["rouge_l"] <= 1 and "chrf" in base
    losses = result["error_analysis"]["reward"]
    assert len(losses) == min(2, result["losses"])
    margins = [row["margin"] for row in losses]
    assert margins == sorted(margins) and all(m < 0 for m in margins)
    for row in losses:
        i = [p[-1]["content"] for p in PROMPTS].index(row["prompt"])
        assert (row["candidate"], row["baseline"]) == (cand["responses"][i], base["responses"][i])
    assert result["error_analysis"]["judge"] == []  # ties are not losses
    markdown = report_markdown(result)
    assert "| reward model |" in markdown and "LLM judge (fake)" in markdown and "perplexity" in markdown
    assert "Where the candidate lost most (by reward)" in markdown


def test_error_analysis_ranks_the_judges_worst_losses() -> None:
    from reward.error_analysis import judge_losses

    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    cand = {"responses": ["c0", "c1", "c2", "c3"]}
    base = {"responses": ["b0", "b1", "b2", "b3"]}
    scores = [0.25, 1.0, 0.0, None]
    verdicts = [("B", "tie"), ("A", "B"), ("B", "A"), (None, None)]
    rows = judge_losses(prompts, cand, base, scores, verdicts, top_k=5)
    assert [(r["prompt"], r["candidate"], r["baseline"], r["judge_score"]) for r in rows] == [
        ("q2", "c2", "b2", 0.0),
        ("q0", "c0", "b0", 0.25),
    ]
    assert rows[0]["verdicts"] == {"candidate_first": "B", "baseline_first": "A"}


def test_error_analysis_ranks_the_reward_models_worst_losses() -> None:
    from reward.error_analysis import reward_losses

    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    cand = {"responses": ["c0", "c1", "c2", "c3"], "rewards": [0.0, 1.0, -2.0, 0.5]}
    base = {"responses": ["b0", "b1", "b2", "b3"], "rewards": [1.0, 0.0, 0.0, 0.5]}
    rows = reward_losses(prompts, cand, base, tie_tolerance=1e-3, top_k=5)
    assert [(r["prompt"], r["candidate"], r["baseline"], r["margin"]) for r in rows] == [
        ("q2", "c2", "b2", -2.0),
        ("q0", "c0", "b0", -1.0),
    ]


def test_error_analysis_is_printed_beside_the_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    from reward.eval_report import print_comparison, report_markdown

    side = {
        "model": "m",
        "mean_reward": 0.0,
        "kl_to_reference": 0.0,
        "mean_length": 3.0,
        "ended_with_eos": 1.0,
    }
    loss = {"prompt": "Name a sea.", "candidate": "Rock.", "baseline": "The Baltic.", "candidate_reward": -1.0,
            "baseline_reward": 2.0, "margin": -3.0}  # fmt: skip
    result = {
        "prompts": 1, "wins": 0, "ties": 0, "losses": 1, "win_rate": 0.0, "win_rate_ci95": [0.0, 0.0],
        "candidate": side, "baseline": side, "error_analysis": {"reward": [loss], "judge": []},
    }  # fmt: skip
    print_comparison(result)
    out = capsys.readouterr().out
    assert "where the candidate lost most (by reward)" in out and "The Baltic." in out and "Rock." in out
    assert "| Name a sea. | Rock. | The Baltic. | -1 vs 2 |" in report_markdown(result)


def test_eval_takes_the_adapters_own_tokenizer(tiny_model: Path, tmp_path: Path) -> None:
    """alignment.policy's one rule: a candidate adapter that saved a tokenizer is sampled with it."""
    from jinja2.exceptions import TemplateError
    from peft import LoraConfig, get_peft_model

    from alignment.devices import plan_device
    from alignment.models import load_causal_lm, load_tokenizer
    from reward.evaluate import evaluate_policy

    adapter = tmp_path / "adapter"
    get_peft_model(load_causal_lm(tiny_model), LoraConfig(r=2, target_modules="all-linear")).save_pretrained(
        adapter
    )
    tokenizer = load_tokenizer(tiny_model)
    tokenizer.chat_template = "{{ raise_exception('the adapter template') }}"
    tokenizer.save_pretrained(adapter)

    def scorer(prompts, texts):
        return [0.0] * len(texts)

    with pytest.raises(TemplateError, match="the adapter template"):
        evaluate_policy(
            ModelSpec(model=str(tiny_model), adapter=adapter), PROMPTS, scorer, SAMPLING, plan_device()
        )
    (adapter / "tokenizer_config.json").unlink()  # no tokenizer of its own: the base's
    result = evaluate_policy(
        ModelSpec(model=str(tiny_model), adapter=adapter), PROMPTS, scorer, SAMPLING, plan_device()
    )
    assert len(result["responses"]) == len(PROMPTS)
