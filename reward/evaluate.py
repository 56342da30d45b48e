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
All sampling goes through `sample_responses`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from alignment.config import StrictModel
from alignment.data_files import read_rows
from alignment.devices import DevicePlan, DTypeName, plan_device
from alignment.messages import Message
from alignment.models import DEFAULT_MODEL, adapter_base_model, load_tokenizer, load_with_adapter
from alignment.preference_data import (
    EXAMPLE_PREFERENCES,
    in_eval_split,
    load_preference_rows,
    pair_id,
    prompt_messages,
    to_canonical,
)
from alignment.sft_data import load_conversations, to_prompt_completion
from reward.judge import JudgeSettings, LLMJudge
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


# --- prompts -------------------------------------------------------------------------------------


def _reference(row: dict[str, Any], canonical: dict[str, Any] | None) -> str | None:
    """A reference answer where the row has one: a pair's chosen reply, a conversation's last reply,
    or a `reference` string."""
    if canonical is not None:
        return canonical["chosen"][-1]["content"]
    if isinstance(row.get("reference"), str):
        return row["reference"]
    messages = row.get("messages")
    if isinstance(messages, list) and len(messages) > 1 and isinstance(messages[-1], dict):
        last = messages[-1]
        if last.get("role") == "assistant" and isinstance(last.get("content"), str):
            return last["content"]
    return None


def load_eval_items(
    path: Path, eval_fraction: float | None, limit: int
) -> tuple[list[Messages], list[str | None]]:
    """(prompts, reference answers or None) of the held-out split, keyed by the hashed id training split on."""
    prompts, references = [], []
    for where, row in read_rows(Path(path)):
        canonical = None
        if "chosen" in row and "rejected" in row:
            canonical = to_canonical(row, where)
            prompt, row_id = canonical["prompt"], canonical["id"]
        else:
            prompt = prompt_messages(row, where)
            row_id = str(row["id"]) if row.get("id") is not None else pair_id(prompt, [], [])
        if eval_fraction is None or in_eval_split(row_id, eval_fraction):
            prompts.append(prompt)
            references.append(_reference(row, canonical))
    return prompts[:limit], references[:limit]


def load_eval_prompts(path: Path, eval_fraction: float | None, limit: int) -> list[Messages]:
    """Prompts of the held-out split, keyed by the same hashed id training split on."""
    return load_eval_items(path, eval_fraction, limit)[0]


# --- generation and log-probs --------------------------------------------------------------------


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def sample_responses(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Messages], sampling: SamplingSettings
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) per prompt; a response is cut after its first EOS, which it keeps."""
    torch.manual_seed(sampling.seed)
    eos = tokenizer.eos_token_id
    prompt_ids = [
        tokenizer(
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for p in prompts
    ]
    responses: list[list[int]] = []
    for start in range(0, len(prompt_ids), sampling.batch_size):
        batch = prompt_ids[start : start + sampling.batch_size]
        width = max(map(len, batch))
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(b)) + b for b in batch])
        attention_mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        out = model.generate(
            input_ids=input_ids.to(_device(model)),
            attention_mask=attention_mask.to(_device(model)),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        for row in out[:, width:].tolist():
            responses.append(row[: row.index(eos) + 1] if eos in row else row)
    return prompt_ids, responses


@torch.inference_mode()
def sequence_logprobs(
    model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: list[list[int]], batch_size: int = 8
) -> list[np.ndarray]:
    """Per-token log pi(y_t | x, y_<t) of each response given its prompt."""
    out: list[np.ndarray] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, responses = prompt_ids[start : start + batch_size], response_ids[start : start + batch_size]
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        width = max(map(len, seqs))
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=_device(model))
        attention_mask = torch.tensor(
            [[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=_device(model)
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        # Position t predicts token t+1.
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            out.append(logps[i, len(p) - 1 : len(p) - 1 + len(r)].cpu().numpy())
    return out


@contextlib.contextmanager
def reference_of(
    model: torch.nn.Module, reference: torch.nn.Module | None = None
) -> Iterator[torch.nn.Module]:
    """The reference policy: an explicit one, else the same weights with the LoRA adapter switched off."""
    if reference is not None:
        yield reference
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def mean_kl(policy_logps: list[np.ndarray], reference_logps: list[np.ndarray]) -> float:
    per_sequence = [
        float(np.mean(p - q)) for p, q in zip(policy_logps, reference_logps, strict=True) if len(p)
    ]
    return float(np.mean(per_sequence)) if per_sequence else 0.0


def implicit_reward_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    beta: float,
    batch_size: int,
    reference: torch.nn.Module | None = None,
) -> dict[str, float]:
    """DPO's implicit reward r = beta * log(pi / pi_ref) ranks held-out chosen above rejected how often?"""

    def encode(messages: Messages) -> list[int]:
        return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]

    prompt_ids, response_ids = [], []
    for side in ("chosen", "rejected"):
        for row in pairs:
            prompt = encode_prompt(tokenizer, row["prompt"])
            full = encode(row["prompt"] + row[side])
            prompt_ids.append(prompt)
            response_ids.append(full[len(prompt) :])
    policy = sequence_logprobs(model, prompt_ids, response_ids, batch_size)
    with reference_of(model, reference) as ref:
        reference_logps = sequence_logprobs(ref, prompt_ids, response_ids, batch_size)
    rewards = np.array([beta * float(np.sum(p - q)) for p, q in zip(policy, reference_logps, strict=True)])
    n = len(pairs)
    margins = rewards[:n] - rewards[n:]
    return {
        "implicit_reward_accuracy": float(np.mean(margins > 0)),
        "implicit_reward_margin": float(margins.mean()),
    }


def encode_prompt(tokenizer: Any, prompt: Messages) -> list[int]:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def perplexity(
    model: torch.nn.Module, tokenizer: Any, conversations: list[Messages], batch_size: int = 8
) -> dict[str, float]:
    """exp(mean NLL per assistant token) over every assistant turn of held-out conversations, each
    given the conversation before it (the tokens SFT trains on, end-of-turn tokens included)."""
    examples = to_prompt_completion(conversations)
    prompt_ids, response_ids = [], []
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex["prompt"])
        text = tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids.append(prompt)
        response_ids.append(full[len(prompt) :])
    logps = sequence_logprobs(model, prompt_ids, response_ids, batch_size)
    tokens = sum(len(lp) for lp in logps)
    nll = -sum(float(lp.sum()) for lp in logps)
    return {"perplexity": math.exp(nll / tokens) if tokens else float("nan"), "heldout_tokens": tokens}


def reference_metrics(predictions: list[str], references: list[str | None]) -> dict[str, float]:
    """ROUGE-L F1 (mean over answers), corpus BLEU and chrF, on the answers that have a reference."""
    import sacrebleu
    from rouge_score import rouge_scorer

    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if r]
    if not pairs:
        return {}
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l = [rouge.score(r, p)["rougeL"].fmeasure for p, r in pairs]
    return {
        "rouge_l": float(np.mean(rouge_l)),
        "bleu": float(sacrebleu.corpus_bleu(preds, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(preds, [refs]).score),
        "references": len(pairs),
    }


# --- the comparison ------------------------------------------------------------------------------


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
    tokenizer = load_tokenizer(spec.base)
    model = load_with_adapter(spec.base, spec.adapter, plan).eval()
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
    ref = load_with_adapter(reference.base, reference.adapter, plan).eval() if reference else None
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


def _prompt_text(prompt: Messages) -> str:
    return prompt[-1]["content"] if prompt else ""


def reward_losses(
    prompts: list[Messages], cand: dict[str, Any], base: dict[str, Any], tie_tolerance: float, top_k: int
) -> list[dict[str, Any]]:
    """The prompts the candidate lost by the largest reward margin, with both answers."""
    margins = np.array(cand["rewards"]) - np.array(base["rewards"])
    order = [int(i) for i in np.argsort(margins, kind="stable") if margins[i] < -tie_tolerance]
    return [
        {
            "prompt": _prompt_text(prompts[i]),
            "candidate": cand["responses"][i],
            "baseline": base["responses"][i],
            "candidate_reward": cand["rewards"][i],
            "baseline_reward": base["rewards"][i],
            "margin": float(margins[i]),
        }
        for i in order[:top_k]
    ]


def judge_losses(
    prompts: list[Messages],
    cand: dict[str, Any],
    base: dict[str, Any],
    scores: list[float | None],
    verdicts: list[tuple[Any, Any]],
    top_k: int,
) -> list[dict[str, Any]]:
    """The prompts the judge gave to the baseline, lost in both orders first."""
    lost = sorted((s, i) for i, s in enumerate(scores) if s is not None and s < 0.5)
    return [
        {
            "prompt": _prompt_text(prompts[i]),
            "candidate": cand["responses"][i],
            "baseline": base["responses"][i],
            "judge_score": s,
            "verdicts": {"candidate_first": verdicts[i][0], "baseline_first": verdicts[i][1]},
        }
        for s, i in lost[:top_k]
    ]


SUMMARY_KEYS = (
    "mean_reward",
    "kl_to_reference",
    "mean_length",
    "ended_with_eos",
    "implicit_reward_accuracy",
    "perplexity",
    "rouge_l",
    "bleu",
    "chrf",
)


def _ci(interval: list[float] | None) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def win_rate_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(judge, win rate with its 95% interval, W/T/L) for each judge of the comparison."""
    rows = [
        (
            "reward model",
            f"{result['win_rate']:.3f} {_ci(result.get('win_rate_ci95'))}",
            f"W {result['wins']} / T {result['ties']} / L {result['losses']}",
        )
    ]
    if judge := result.get("judge"):
        bias = (
            f", picks A {judge['position_bias']:.2f}"
            if judge["position_bias"] == judge["position_bias"]
            else ""
        )
        rows.append(
            (
                f"LLM judge ({judge['model']})",
                f"{judge['win_rate']:.3f} {_ci(judge.get('win_rate_ci95'))}",
                f"W {judge['wins']} / T {judge['ties']} / L {judge['losses']}, "
                f"{judge['parse_failures']} parse failures{bias}",
            )
        )
    return rows


def print_comparison(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"candidate vs baseline on {result['prompts']} prompts")
    table.add_column("metric")
    table.add_column("candidate", justify="right")
    table.add_column("baseline", justify="right")
    table.add_row("model", result["candidate"]["model"], result["baseline"]["model"])
    for key in SUMMARY_KEYS:
        cells = [result[side].get(key) for side in ("candidate", "baseline")]
        if any(c is not None for c in cells):
            table.add_row(key, *("-" if c is None else f"{c:.4g}" for c in cells))
    if "perplexity_increase" in result:
        table.add_row("perplexity increase", f"{result['perplexity_increase']:+.2%}", "")
    for judge, rate, counts in win_rate_rows(result):
        table.add_row(f"win rate by {judge} (95% CI)", rate, counts)
    console = Console()
    console.print(table)
    for judge, losses in result.get("error_analysis", {}).items():
        if not losses:
            continue
        worst = Table(title=f"where the candidate lost most (by {judge})", show_lines=True)
        for column in ("prompt", "candidate", "baseline", "score"):
            worst.add_column(column, overflow="fold", max_width=48 if column != "score" else 18)
        for row in losses:
            score = (
                f"{row['candidate_reward']:.3g} vs {row['baseline_reward']:.3g}"
                if "margin" in row
                else f"judge {row['judge_score']:.2f}"
            )
            worst.add_row(row["prompt"], row["candidate"], row["baseline"], score)
        console.print(worst)


def _cell(text: Any, limit: int = 200) -> str:
    text = str(text).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report_markdown(result: dict[str, Any]) -> str:
    """eval.md: the metrics table, every win rate with its interval, and the error analysis."""
    cand, base = result["candidate"], result["baseline"]
    lines = [
        f"# Evaluation: candidate vs baseline on {result['prompts']} prompts",
        "",
        "| metric | candidate | baseline |",
        "| --- | ---: | ---: |",
        f"| model | {_cell(cand['model'])} | {_cell(base['model'])} |",
    ]
    for key in SUMMARY_KEYS:
        cells = [cand.get(key), base.get(key)]
        if any(c is not None for c in cells):
            lines.append(f"| {key} | " + " | ".join("-" if c is None else f"{c:.4g}" for c in cells) + " |")
    lines += ["", "| judge | win rate [95% CI] | outcome |", "| --- | --- | --- |"]
    lines += [f"| {j} | {r} | {c} |" for j, r, c in win_rate_rows(result)]
    if "perplexity_increase" in result:
        lines.append(f"\nPerplexity increase of the candidate: {result['perplexity_increase']:+.2%}.")
    for judge, losses in result.get("error_analysis", {}).items():
        lines += ["", f"## Where the candidate lost most (by {judge})", ""]
        if not losses:
            lines.append("No losses.")
            continue
        lines += ["| prompt | candidate | baseline | score |", "| --- | --- | --- | --- |"]
        for row in losses:
            score = (
                f"{row['candidate_reward']:.3g} vs {row['baseline_reward']:.3g}"
                if "margin" in row
                else f"{row['judge_score']:.2f}"
            )
            lines.append(
                f"| {_cell(row['prompt'])} | {_cell(row['candidate'])} | {_cell(row['baseline'])} | {score} |"
            )
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    cand, base = np.array(result["candidate"]["rewards"]), np.array(result["baseline"]["rewards"])
    bins = np.linspace(min(cand.min(), base.min()), max(cand.max(), base.max()) + 1e-6, 20)
    left.hist(base, bins=bins, alpha=0.6, label="baseline")
    left.hist(cand, bins=bins, alpha=0.6, label="candidate")
    left.set(xlabel="reward", ylabel="responses", title="Reward of sampled responses")
    left.legend()
    right.bar(
        ["wins", "ties", "losses"],
        [result["wins"], result["ties"], result["losses"]],
        color=["tab:green", "tab:grey", "tab:red"],
    )
    right.set_title(f"Candidate win rate {result['win_rate']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
