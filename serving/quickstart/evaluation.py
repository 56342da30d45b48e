"""Stage 8: the aligned model against the SFT model on the held-out prompts.

Rubric win rate (the ground truth the simulated team approximates), reward-model win rate, KL to SFT
and length, each win rate with its 95% interval (reward.win_rate).
"""

from __future__ import annotations

from typing import Any

from serving.quickstart.context import Context, Row, read_json, staged, write_json
from serving.quickstart.prompts import as_messages, load_split
from serving.quickstart.rubric import Rubric, score

# --- 8. evaluation: aligned vs SFT on held-out prompts ------------------------------------------


class RecordingScorer:
    """The rubric as `compare_models`' scorer, keeping each call's texts so the reward model can score them too."""

    def __init__(self, rubric: Rubric) -> None:
        self.rubric = rubric
        self.calls: list[tuple[list[Any], list[str]]] = []

    def __call__(self, prompts: list[Any], responses: list[str]) -> list[float]:
        self.calls.append((list(prompts), list(responses)))
        return [
            score(self.rubric, p[-1]["content"], r).total for p, r in zip(prompts, responses, strict=True)
        ]


def run_eval(ctx: Context) -> Row:
    from reward.evaluate import ModelSpec, SamplingSettings, compare_models
    from reward.scorer import RewardScorer
    from serving.quickstart.stats import win_rate

    e = ctx.config.eval
    _, heldout = load_split(ctx.config.prompts)
    prompts = [as_messages(p) for p in heldout]
    aligned = ctx.path(ctx.config.algorithm)
    sft = ctx.path("sft")
    rubric_scorer = RecordingScorer(ctx.rubric)
    sampling = SamplingSettings(
        max_new_tokens=e.max_new_tokens, temperature=e.temperature, batch_size=e.batch_size, seed=e.seed
    )
    result = compare_models(
        ModelSpec(model=ctx.model_name(), adapter=aligned),
        ModelSpec(model=ctx.model_name(), adapter=sft),
        rubric_scorer,
        prompts,
        sampling,
        reference=ModelSpec(model=ctx.model_name(), adapter=sft),
    )
    (_, aligned_texts), (_, sft_texts) = rubric_scorer.calls
    reward_model = RewardScorer.from_pretrained(ctx.path("reward"))
    rm_aligned, rm_sft = reward_model(prompts, aligned_texts), reward_model(prompts, sft_texts)
    tol = ctx.rubric.tie_tolerance
    rubric_win = win_rate(
        result["candidate"]["rewards"], result["baseline"]["rewards"], tol, e.bootstrap, e.seed
    )
    rm_win = win_rate(rm_aligned, rm_sft, 1e-3, e.bootstrap, e.seed)

    def criteria(texts: list[str]) -> dict[str, float]:
        scores = [score(ctx.rubric, p, t) for p, t in zip(heldout, texts, strict=True)]
        names = scores[0].criteria
        out = {n: sum(s.criteria[n] for s in scores) / len(scores) for n in names}
        out["mean_words"] = sum(s.words for s in scores) / len(scores)
        return out

    report: Row = {
        "algorithm": ctx.config.algorithm,
        "prompts": len(prompts),
        "rubric_win_rate": rubric_win,
        "reward_model_win_rate": rm_win,
        "kl_to_sft": {
            "aligned": result["candidate"]["kl_to_reference"],
            "sft": result["baseline"]["kl_to_reference"],
        },
        "mean_length_tokens": {
            "aligned": result["candidate"]["mean_length"],
            "sft": result["baseline"]["mean_length"],
        },
        "ended_with_eos": {
            "aligned": result["candidate"]["ended_with_eos"],
            "sft": result["baseline"]["ended_with_eos"],
        },
        "rubric_mean": {
            "aligned": sum(result["candidate"]["rewards"]) / len(prompts),
            "sft": sum(result["baseline"]["rewards"]) / len(prompts),
        },
        "reward_mean": {"aligned": sum(rm_aligned) / len(prompts), "sft": sum(rm_sft) / len(prompts)},
        "criteria": {"aligned": criteria(aligned_texts), "sft": criteria(sft_texts)},
        "sampling": result["sampling"],
        "samples": [
            {"prompt": p, "sft": s, "aligned": a, "rubric_sft": r_s, "rubric_aligned": r_a}
            for p, s, a, r_s, r_a in zip(
                heldout,
                sft_texts,
                aligned_texts,
                result["baseline"]["rewards"],
                result["candidate"]["rewards"],
                strict=True,
            )
        ],
    }
    final = ctx.path("eval")
    with staged(final) as out:
        write_json(out / "eval.json", report)
    return {
        "rubric_win_rate": rubric_win["win_rate"],
        "rubric_ci95": rubric_win["ci95"],
        "reward_model_win_rate": rm_win["win_rate"],
        "reward_model_ci95": rm_win["ci95"],
        "kl_to_sft": report["kl_to_sft"]["aligned"],
    }


def valid_eval(ctx: Context) -> bool:
    path = ctx.path("eval") / "eval.json"
    try:
        data = read_json(path)
        return data["algorithm"] == ctx.config.algorithm and len(data["rubric_win_rate"]["ci95"]) == 2
    except (OSError, ValueError, KeyError):
        return False
