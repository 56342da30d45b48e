"""Candidate vs baseline on held-out prompts, judged by a reward model and an LLM judge (`prefloop eval`).

For each model (base + optional LoRA adapter) we sample one response per prompt and report:
- win rate of candidate over baseline by reward (ties counted apart and as half a win), and by an
  LLM judge (`reward.judge`, both orders) when one is configured; every win rate with a 95% interval
  (`reward.win_rate`),
- mean reward and mean response length (tokens), and the fraction of responses that ended (EOS),
- KL to the reference policy, estimated on the model's own samples as the mean per-token log-ratio
  KL(pi || pi_ref) ~= E_{y ~ pi} [ (1/|y|) sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ],
- for adapter models given a preference eval set, the DPO implicit-reward accuracy
  r(x, y) = beta * log pi(y|x) / pi_ref(y|x),  accuracy = P[r(x, y_chosen) > r(x, y_rejected)].
The reference is the base model with the adapter disabled (no second copy in memory), or an explicit
reference model - e.g. the SFT adapter a DPO adapter started from.
- perplexity on held-out SFT conversations, exp(total NLL of the assistant tokens / their number),
- ROUGE-L (rouge-score), BLEU and chrF (sacrebleu) against reference answers where the prompts have them,
- error analysis: the prompts where the candidate lost most, by each judge, beside the baseline's answer.

`compare_models` is the Python entry point (the serving loop's promotion gate calls it);
`run_eval(EvalConfig)` adds loading from files and writes eval.json, eval.md and eval.png.
All sampling goes through `sample_responses`. What is measured per model lives in
`reward.policy_metrics`, the held-out prompts in `reward.eval_data`, the worst losses in
`reward.error_analysis`, and the table, eval.md and eval.png in `reward.eval_report`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from alignment.config import StrictModel
from alignment.devices import DevicePlan, DTypeName, plan_device
from alignment.messages import Message
from alignment.models import DEFAULT_MODEL, adapter_base_model
from alignment.policy import load_policy, load_policy_tokenizer
from alignment.preference_data import EXAMPLE_PREFERENCES, load_preference_rows
from alignment.sft_data import load_conversations
from reward.error_analysis import judge_losses, reward_losses
from reward.eval_data import load_eval_items
from reward.eval_report import plot_comparison, report_markdown
from reward.judge import JudgeSettings, LLMJudge
from reward.policy_metrics import (
    encode_prompt,
    implicit_reward_accuracy,
    mean_kl,
    perplexity,
    reference_metrics,
    reference_of,
    sequence_logprobs,
)
from reward.win_rate import outcomes, win_rate_with_ci

Messages = list[Message]
Scorer = Callable[[list[Any], list[str]], list[float]]


class ModelSpec(StrictModel):
    model: str | None = Field(
        None, description="Base model; default: the adapter's base (or prefloop's default)."
    )
    adapter: Path | None = Field(None, description="LoRA adapter directory.")

    @property
    def base(self) -> str:
        if self.model:
            return self.model
        return adapter_base_model(self.adapter) if self.adapter else DEFAULT_MODEL

    @property
    def label(self) -> str:
        return str(self.adapter) if self.adapter else self.base


class SamplingSettings(StrictModel):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0


class EvalConfig(StrictModel):
    candidate: ModelSpec
    baseline: ModelSpec = Field(default_factory=ModelSpec, description="Default: the candidate's base model.")
    reference: ModelSpec | None = Field(
        None,
        description="Model that KL and implicit rewards are measured against (default: adapter disabled).",
    )
    reward_model: Path = Field(..., description="Reward model directory (from `prefloop train reward`).")
    prompts: Path = Field(
        EXAMPLE_PREFERENCES, description="Preference, conversation or prompt JSONL/dataset."
    )
    eval_fraction: float | None = Field(
        0.1,
        gt=0,
        le=1,
        description="Use only the hashed-id held-out split (as in training); null = all rows.",
    )
    max_prompts: int = Field(64, ge=1)
    preference_eval: Path | None = Field(None, description="Pairs for the DPO implicit-reward accuracy.")
    beta: float = Field(
        0.1, gt=0, description="DPO beta (scales the implicit reward; accuracy does not depend on it)."
    )
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    judge: JudgeSettings | None = Field(None, description="LLM judge for a second win rate; null = none.")
    sft_heldout: Path | None = Field(
        None, description="Held-out SFT conversations (JSONL/datasets) for perplexity; null = skip."
    )
    max_heldout: int = Field(64, ge=1, description="Conversations of sft_heldout used.")
    tie_tolerance: float = Field(1e-3, ge=0, description="Reward differences this small are ties.")
    error_analysis_top_k: int = Field(5, ge=0, description="Worst-lost prompts listed per judge.")
    dtype: DTypeName = "auto"
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads (on a shared CPU fewer is faster)."
    )
    output_dir: Path = Path("runs/eval")


# --- sampling and the comparison ------------------------------------------------------------


@torch.inference_mode()
def sample_responses(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Messages], sampling: SamplingSettings
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) per prompt; a response is cut after its first EOS, which it keeps.
    Sampled by the generation engine (alignment.generation), `batch_size` rows decoding at once."""
    from alignment.generation import SamplingParams, policy_engine

    torch.manual_seed(sampling.seed)
    eos = tokenizer.eos_token_id
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    engine = policy_engine(model, tokenizer, max_batch_size=sampling.batch_size, eos_token_ids=[eos])
    greedy = sampling.temperature == 0
    params = SamplingParams(sampling.temperature, 1.0 if greedy else sampling.top_p, sampling.max_new_tokens)
    seqs = engine.generate(prompt_ids, params, engine.merged)
    responses = [s.tokens + ([s.eos_token] if s.eos_token is not None else []) for s in seqs]
    return prompt_ids, responses


def evaluate_policy(
    spec: ModelSpec,
    prompts: list[Messages],
    scorer: Scorer,
    sampling: SamplingSettings,
    plan: DevicePlan,
    preference_pairs: list[dict[str, Any]] | None = None,
    beta: float = 0.1,
    reference: torch.nn.Module | None = None,
    heldout: list[Messages] | None = None,
    references: list[str | None] | None = None,
) -> dict[str, Any]:
    """Sample, score, and measure one model; returns summary numbers plus per-prompt rewards and answers."""
    # The one rule (alignment.policy): the adapter's own tokenizer when its run saved one.
    tokenizer = load_policy_tokenizer(spec.base, spec.adapter)
    model = load_policy(spec.base, spec.adapter, plan)[0].eval()
    prompt_ids, response_ids = sample_responses(model, tokenizer, prompts, sampling)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in response_ids]
    rewards = scorer(prompts, texts)
    has_reference = spec.adapter is not None or reference is not None
    if has_reference:
        policy = sequence_logprobs(model, prompt_ids, response_ids, sampling.batch_size)
        with reference_of(model, reference) as ref:
            kl = mean_kl(policy, sequence_logprobs(ref, prompt_ids, response_ids, sampling.batch_size))
    else:
        kl = 0.0  # the base model is its own reference
    result: dict[str, Any] = {
        "model": spec.label,
        "mean_reward": float(np.mean(rewards)),
        "kl_to_reference": kl,
        "mean_length": float(np.mean([len(r) for r in response_ids])),
        "ended_with_eos": float(np.mean([bool(r) and r[-1] == tokenizer.eos_token_id for r in response_ids])),
        "rewards": [float(r) for r in rewards],
        "responses": texts,
        "samples": [
            {"prompt": p[-1]["content"], "response": t} for p, t in zip(prompts[:3], texts[:3], strict=False)
        ],
    }
    if preference_pairs and has_reference:
        result.update(
            implicit_reward_accuracy(model, tokenizer, preference_pairs, beta, sampling.batch_size, reference)
        )
    if heldout:
        result.update(perplexity(model, tokenizer, heldout, sampling.batch_size))
    if references:
        result.update(reference_metrics(texts, references))
    del model
    return result


def compare_models(
    candidate: ModelSpec,
    baseline: ModelSpec,
    scorer: Scorer,
    prompts: list[Messages],
    sampling: SamplingSettings | None = None,
    preference_pairs: list[dict[str, Any]] | None = None,
    beta: float = 0.1,
    plan: DevicePlan | None = None,
    tie_tolerance: float = 1e-3,
    reference: ModelSpec | None = None,
    judge: LLMJudge | None = None,
    heldout: list[Messages] | None = None,
    references: list[str | None] | None = None,
    top_k: int = 5,
) -> dict[str, Any]:
    """Win rate of candidate over baseline on the same prompts, plus each model's reward, KL and length.

    KL and implicit rewards are against `reference` when given, else each model's adapter-disabled base.
    With `judge`, an LLM-judge win rate too; with `heldout` conversations, each model's perplexity;
    with `references`, ROUGE-L/BLEU/chrF. `error_analysis` lists the `top_k` worst-lost prompts per judge.
    """
    sampling = sampling or SamplingSettings()
    plan = plan or plan_device()
    ref = load_policy(reference.base, reference.adapter, plan)[0].eval() if reference else None
    extra = {"heldout": heldout, "references": references}
    cand = evaluate_policy(candidate, prompts, scorer, sampling, plan, preference_pairs, beta, ref, **extra)
    base = evaluate_policy(baseline, prompts, scorer, sampling, plan, preference_pairs, beta, ref, **extra)
    by_reward = win_rate_with_ci(outcomes(cand["rewards"], base["rewards"], tie_tolerance))
    result: dict[str, Any] = {
        "prompts": len(prompts),
        "wins": by_reward["wins"],
        "ties": by_reward["ties"],
        "losses": by_reward["losses"],
        "win_rate": by_reward["win_rate"],
        "win_rate_ci95": by_reward["ci95"],
        "candidate": cand,
        "baseline": base,
        "sampling": sampling.model_dump(),
    }
    analysis = {"reward": reward_losses(prompts, cand, base, tie_tolerance, top_k)}
    if judge is not None:
        verdicts = judge.compare(prompts, cand["responses"], base["responses"])
        decided = win_rate_with_ci(verdicts.decided)
        result["judge"] = {
            **verdicts.summary(),
            "model": judge.settings.model,
            "win_rate_ci95": decided["ci95"],
            "scores": verdicts.scores,
        }
        analysis["judge"] = judge_losses(prompts, cand, base, verdicts.scores, verdicts.verdicts, top_k)
    if "perplexity" in cand and "perplexity" in base:
        result["perplexity_increase"] = cand["perplexity"] / base["perplexity"] - 1
    result["error_analysis"] = analysis
    return result


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """File-driven `compare_models`: writes eval.json and eval.png to output_dir; returns the result."""
    from reward.scorer import RewardScorer

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    plan = plan_device(config.dtype)
    baseline = (
        config.baseline
        if (config.baseline.model or config.baseline.adapter)
        else ModelSpec(model=config.candidate.base)
    )
    prompts, references = load_eval_items(config.prompts, config.eval_fraction, config.max_prompts)
    pairs = load_preference_rows(config.preference_eval) if config.preference_eval else None
    heldout = load_conversations(config.sft_heldout)[: config.max_heldout] if config.sft_heldout else None
    judge = LLMJudge(config.judge) if config.judge else None
    scorer = RewardScorer.from_pretrained(config.reward_model, plan)
    result = compare_models(
        config.candidate,
        baseline,
        scorer,
        prompts,
        config.sampling,
        pairs,
        config.beta,
        plan,
        tie_tolerance=config.tie_tolerance,
        reference=config.reference,
        judge=judge,
        heldout=heldout,
        references=references if any(references) else None,
        top_k=config.error_analysis_top_k,
    )
    if judge is not None:
        judge.close()
    config.output_dir.mkdir(parents=True, exist_ok=True)
    (config.output_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    (config.output_dir / "eval.md").write_text(report_markdown(result), encoding="utf-8")
    plot_comparison(result, config.output_dir / "eval.png")
    return result
