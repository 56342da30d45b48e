"""The continuous feedback loop: ingest -> trigger -> retrain -> evaluate -> gate -> promote -> hot-swap.

One `run_once` is one turn of the loop. It turns the store's feedback into the next dataset version,
and when enough new pairs arrived (or the schedule says so) it trains a candidate from the current
model (DPO on pairs, KTO when there is only unpaired thumbs data), evaluates it against the current
model, and promotes it only if the gate passes; a running server is then told to hot-swap.

The trainer and the evaluator are plain callables (`Trainer`, `Evaluator`), so a deployment can
plug its own and tests can use a programmatic scorer; the defaults call prefloop's own
`alignment` trainers and `reward` evaluation.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import httpx

from alignment.data_files import read_jsonl
from alignment.prompts import load_prompts
from serving.config import EvalSettings, GateSettings, LoopConfig
from serving.feedback_store import FeedbackStore, utcnow
from serving.ingest import DatasetVersion, ingest, load_version, pair_ids
from serving.registry import ModelRegistry, VersionInfo

log = logging.getLogger("prefloop.loop")

REGRESSION_PROMPTS = Path(__file__).parent / "data" / "regression_prompts.jsonl"


@dataclass(frozen=True)
class TrainJob:
    algorithm: Literal["dpo", "kto"]
    base_model: str
    init_adapter: Path | None  # the current version's adapter: training continues from the served model
    data: DatasetVersion
    output_dir: Path
    config_path: Path | None
    overrides: dict[str, Any]


@dataclass(frozen=True)
class EvalJob:
    base_model: str
    candidate_adapter: Path
    current_adapter: Path | None  # None = the base model is current
    prompts: list[list[dict[str, str]]]
    settings: EvalSettings
    output_dir: Path


# (job) -> adapter directory / (job) -> metrics such as win_rate, kl, length_ratio, regression_pass_rate
Trainer = Callable[[TrainJob], Path]
Evaluator = Callable[[EvalJob], dict[str, Any]]


@dataclass
class LoopResult:
    status: Literal["waiting", "promoted", "rejected", "no_data"]
    data_version: str | None
    new_pairs: int
    version: str | None = None
    eval_result: dict[str, Any] = field(default_factory=dict)
    gate_failures: list[str] = field(default_factory=list)
    swapped: bool = False


def check_gate(result: dict[str, Any], gate: GateSettings) -> list[str]:
    """Why the candidate may not be promoted (empty = it may)."""
    failures = []
    if result.get("win_rate", 0.0) < gate.min_win_rate:
        failures.append(f"win_rate {result.get('win_rate', 0.0):.3f} < {gate.min_win_rate}")
    if gate.max_kl is not None and result.get("kl", float("inf")) > gate.max_kl:
        failures.append(f"kl {result.get('kl')} > {gate.max_kl}")
    ratio = result.get("length_ratio")
    if gate.max_length_ratio is not None and ratio is not None and ratio > gate.max_length_ratio:
        failures.append(f"length_ratio {ratio:.3f} > {gate.max_length_ratio}")
    if gate.min_regression_pass_rate is not None:
        rate = result.get("regression_pass_rate", 0.0)
        if rate < gate.min_regression_pass_rate:
            failures.append(f"regression_pass_rate {rate:.3f} < {gate.min_regression_pass_rate}")
    # A metric a rule needs but the evaluation lacks (None, or NaN: no judge verdict) fails the rule.
    for key, bound in (
        ("win_rate_lower_bound", gate.min_win_rate_lower_bound),
        ("judge_win_rate", gate.min_judge_win_rate),
    ):
        value = result.get(key)
        if bound is not None and not (value is not None and value >= bound):
            failures.append(f"{key} {_shown(value)} < {bound}")
    increase = result.get("perplexity_increase")
    limit = gate.max_perplexity_increase
    if limit is not None and not (increase is not None and increase <= limit):
        failures.append(f"perplexity_increase {_shown(increase)} > {limit}")
    return failures


def _shown(value: float | None) -> str:
    return "missing" if value is None else f"{value:.3f}"


def notify_server(server_url: str, admin_key: str | None) -> dict[str, Any]:
    """Ask a running server to hot-swap `prefloop-current` to the registry's current version."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    response = httpx.post(f"{server_url.rstrip('/')}/admin/reload", headers=headers, timeout=120)
    response.raise_for_status()
    return response.json()


def _trained_pairs(config: LoopConfig, current: VersionInfo | None) -> set[str]:
    if current is None or current.data_version is None:
        return set()
    path = config.ingest.output_dir / current.data_version
    return pair_ids(load_version(path)) if path.is_dir() else set()


def _kto_rows(data: DatasetVersion) -> int:
    return sum(1 for _ in read_jsonl(data.kto_file)) if data.kto_file.is_file() else 0


def _due(config: LoopConfig, registry: ModelRegistry, new_pairs: int, new_kto: int) -> bool:
    if new_pairs >= config.trigger.min_new_pairs:
        return True
    if config.trigger.every_minutes is None or new_pairs + new_kto == 0:
        return False
    versions = registry.list()
    last = versions[-1].created_at if versions else None
    return last is None or utcnow() - last >= timedelta(minutes=config.trigger.every_minutes)


def run_once(
    config: LoopConfig,
    store: FeedbackStore,
    trainer: Trainer | None = None,
    evaluator: Evaluator | None = None,
    force: bool = False,
    admin_key: str | None = None,
) -> LoopResult:
    """One turn of the loop; returns what happened."""
    registry = ModelRegistry(store, config.serve.adapters_root)
    data = ingest(store, config.ingest.output_dir, config.ingest.min_rating_gap)
    if config.ingest.review:
        data = review_pairs(data, config)
    current = registry.current()
    new_pairs = len(pair_ids(data) - _trained_pairs(config, current))
    new_kto = _kto_rows(data) if current is None or current.data_version != data.version else 0
    versions = [v for v in registry.list() if v.data_version == data.version]
    # A data version whose candidate was evaluated (promoted or rejected) is not retried until
    # feedback changes it. A candidate without an eval is a turn that was killed: it is finished,
    # under the same version id, whether or not it was due.
    unfinished = next((v for v in versions if v.eval_result is None), None)
    tried = any(v.eval_result is not None for v in versions)
    if unfinished is None and not force and (tried or not _due(config, registry, new_pairs, new_kto)):
        return LoopResult("waiting", data.version, new_pairs)
    algorithm = config.algorithm if config.algorithm != "auto" else ("dpo" if data.pairs else "kto")
    if (algorithm == "dpo" and not data.pairs) or (algorithm == "kto" and not _kto_rows(data)):
        return LoopResult("no_data", data.version, new_pairs)

    if evaluator is None and config.eval.reward_model is None:
        # Fail before hours of training, not after.
        raise ValueError("eval.reward_model is not set: the promotion gate needs a reward model")
    base = config.serve.model
    # The row is written before training so the run has its id (and output dir); the adapter path
    # only once training returned, so a row with an adapter always has a complete one.
    version = unfinished or registry.register(
        base_model=base,
        adapter_path=None,
        parent_id=current.id if current else None,
        data_version=data.version,
        config={
            "algorithm": algorithm,
            "train_config": str(config.train_config) if config.train_config else None,
            "train_overrides": config.train_overrides,
            "gate": config.gate.model_dump(),
        },
    )
    output_dir = config.output_dir / version.id
    init_adapter = Path(current.adapter_path) if current and current.adapter_path else None
    if version.adapter_path is None:
        job = TrainJob(
            algorithm, base, init_adapter, data, output_dir, config.train_config, config.train_overrides
        )
        log.info("training %s (%s on %s, %d new pairs)", version.id, algorithm, data.version, new_pairs)
        adapter = (trainer or default_trainer)(job)
        version = registry.update(version.id, adapter_path=str(adapter))
    else:
        log.info("resuming %s after a killed turn: evaluating its adapter", version.id)
        adapter = Path(version.adapter_path)

    prompts = load_prompts(config.eval.prompts or REGRESSION_PROMPTS)
    eval_job = EvalJob(base, adapter, init_adapter, prompts, config.eval, output_dir / "eval")
    result = (evaluator or default_evaluator)(eval_job)
    failures = check_gate(result, config.gate)
    registry.set_eval(
        version.id, {**result, "gate_failures": failures}, "rejected" if failures else "candidate"
    )
    if failures:
        log.info("candidate %s rejected: %s", version.id, "; ".join(failures))
        return LoopResult("rejected", data.version, new_pairs, version.id, result, failures)
    registry.promote(version.id)
    swapped = False
    if config.server_url:
        try:
            notify_server(config.server_url, admin_key)
            swapped = True
        except httpx.HTTPError as exc:
            # The registry is the source of truth: a server that missed the call serves the new
            # version after `POST /admin/reload` or a restart.
            log.warning(
                "promoted %s but could not reach %s to hot-swap: %s", version.id, config.server_url, exc
            )
    return LoopResult("promoted", data.version, new_pairs, version.id, result, [], swapped)


def run_forever(
    config: LoopConfig,
    store: FeedbackStore,
    trainer: Trainer | None = None,
    evaluator: Evaluator | None = None,
    admin_key: str | None = None,
    on_result: Callable[[LoopResult], None] | None = None,
    max_turns: int | None = None,
) -> None:
    """`loop run --watch`: check the trigger every `poll_seconds`."""
    turns = 0
    while max_turns is None or turns < max_turns:
        result = run_once(config, store, trainer, evaluator, admin_key=admin_key)
        if on_result:
            on_result(result)
        turns += 1
        if max_turns is None or turns < max_turns:
            time.sleep(config.trigger.poll_seconds)


def status(config: LoopConfig, store: FeedbackStore) -> dict[str, Any]:
    """What `loop status` prints: current model, data, and how far the trigger is."""
    from serving.ingest import latest_version

    registry = ModelRegistry(store)
    current = registry.current()
    data = latest_version(config.ingest.output_dir)
    pending = len(pair_ids(data) - _trained_pairs(config, current)) if data else 0
    return {
        "current": current.id if current else f"base ({config.serve.model})",
        "versions": [asdict(v) for v in registry.list()],
        "latest_data": data.version if data else None,
        "pairs": data.pairs if data else 0,
        "kto_rows": data.kto if data else 0,
        "pairs_not_trained_on": pending,
        "trigger_min_new_pairs": config.trigger.min_new_pairs,
    }


# --- defaults: prefloop's own trainers and evaluation ------------------------------------------


def default_trainer(job: TrainJob) -> Path:
    """DPO or KTO through `alignment`, configured from `train_config` + overrides + the loop's data."""
    from alignment.checkpoints import latest_checkpoint
    from alignment.config import load_config

    if job.algorithm == "dpo":
        from alignment.dpo import DPORunConfig as RunConfig
        from alignment.dpo import train_dpo as train
    else:
        from alignment.kto import KTORunConfig as RunConfig  # type: ignore[no-redef]
        from alignment.kto import train_kto as train  # type: ignore[no-redef]
    data_file = job.data.preference_file if job.algorithm == "dpo" else job.data.kto_file
    # JSON is valid YAML, so None/lists/numbers survive the `key=value` override parser.
    overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in job.overrides.items()]
    overrides += [f"model={job.base_model}", f"output_dir={job.output_dir}", f"data.train={data_file}"]
    if job.init_adapter is not None:
        overrides.append(f"init_adapter={job.init_adapter}")
    if latest_checkpoint(job.output_dir) is not None:  # a turn killed mid-retrain: continue it
        overrides.append("resume=true")
    train(load_config(RunConfig, job.config_path, overrides))
    return job.output_dir  # `run_training` saves the final adapter there


def reward_evaluator(
    scorer: Callable[[list[Any], list[str]], list[float]] | None = None, threads: int | None = None
) -> Evaluator:
    """`prefloop eval` (`reward.evaluate.compare_models`) as the loop's evaluator.

    Candidate and current model answer the regression prompts greedily; the win rate is by
    `scorer` (prompts, responses) -> rewards, or by the reward model in `eval.reward_model`; KL
    is the candidate's per-token KL to the base model, and the length ratio candidate/current.
    `threads` caps torch's CPU threads for the evaluation (on a shared CPU fewer is faster).
    """

    def evaluate(job: EvalJob) -> dict[str, Any]:
        from reward.evaluate import ModelSpec, SamplingSettings, compare_models

        score = scorer
        if score is None:
            if job.settings.reward_model is None:
                raise ValueError("eval.reward_model is not set: the gate needs a reward model (or a scorer)")
            from reward.scorer import RewardScorer

            score = RewardScorer.from_pretrained(job.settings.reward_model)
        sampling = SamplingSettings(max_new_tokens=job.settings.max_new_tokens, temperature=0.0)
        candidate = ModelSpec(model=job.base_model, adapter=job.candidate_adapter)
        current = ModelSpec(model=job.base_model, adapter=job.current_adapter)
        judge, heldout = _judge_and_heldout(job.settings)
        result = _with_threads(
            threads,
            lambda: compare_models(
                candidate, current, score, job.prompts, sampling, judge=judge, heldout=heldout
            ),
        )
        job.output_dir.mkdir(parents=True, exist_ok=True)
        (job.output_dir / "eval.json").write_text(json.dumps(result, indent=2))
        ours, theirs = result["candidate"], result["baseline"]
        return {
            **_gate_metrics(result),
            "win_rate": result["win_rate"],
            "kl": ours["kl_to_reference"],
            "length_ratio": ours["mean_length"] / max(theirs["mean_length"], 1e-9),
            "reward_candidate": ours["mean_reward"],
            "reward_current": theirs["mean_reward"],
            # A regression prompt passes when the candidate's answer scores no worse than the current one's.
            "regression_pass_rate": (result["wins"] + result["ties"]) / result["prompts"],
            **{k: result[k] for k in ("prompts", "wins", "ties", "losses")},
        }

    return evaluate


def _judge_and_heldout(settings: EvalSettings) -> tuple[Any, Any]:
    """The LLM judge and held-out SFT conversations the gate's judge/perplexity rules need."""
    judge = heldout = None
    if settings.judge is not None:
        from reward.judge import LLMJudge

        judge = LLMJudge(settings.judge)
    if settings.sft_heldout is not None:
        from alignment.sft_data import load_conversations

        heldout = load_conversations(settings.sft_heldout)[: settings.max_heldout]
    return judge, heldout


def _gate_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The judge, interval and perplexity figures the gate reads; the registry keeps them with the version."""

    def finite(x: Any) -> Any:  # NaN (a judge with no verdict) is not valid JSON for PostgreSQL
        return None if isinstance(x, float) and x != x else x

    out: dict[str, Any] = {
        "win_rate_ci95": result["win_rate_ci95"],
        "win_rate_lower_bound": result["win_rate_ci95"][0],
        "error_analysis": result["error_analysis"],
    }
    if judge := result.get("judge"):
        out |= {
            "judge_win_rate": finite(judge["win_rate"]),
            "judge_win_rate_ci95": judge["win_rate_ci95"],
            "judge_position_bias": finite(judge["position_bias"]),
            "judge_decided": judge["decided"],
            "judge_parse_failures": judge["parse_failures"],
        }
    if "perplexity_increase" in result:
        out |= {
            "perplexity_candidate": result["candidate"]["perplexity"],
            "perplexity_current": result["baseline"]["perplexity"],
            "perplexity_increase": result["perplexity_increase"],
        }
    return out


def _with_threads(threads: int | None, fn: Callable[[], Any]) -> Any:
    """Run `fn` in a thread with its own torch thread count (per-thread under OpenMP)."""
    if threads is None:
        return fn()
    from concurrent.futures import ThreadPoolExecutor

    import torch

    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        return pool.submit(fn).result()


default_evaluator = reward_evaluator()


def review_pairs(data: DatasetVersion, config: LoopConfig) -> DatasetVersion:
    """Send candidate pairs to Argilla and train on what reviewers kept (see `feedback ingest --review`)."""
    from serving.review import review_version

    settings = config.ingest
    return review_version(data, settings.output_dir, settings.annotation_config, settings.review_dataset)
