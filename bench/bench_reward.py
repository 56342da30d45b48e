"""Reward-model training and scoring: prefloop vs TRL's RewardTrainer (defaults, and bf16 weights), on the
bundled house-style pairs and on long multi-turn pairs (`bench/make_long_pairs.py`).

    PREFLOOP_HOME=/tmp/pfhome python bench/bench_reward.py --threads 1 [--steps 4] [--long-steps 3] [--rounds 1]

Same model (SmolLM2-135M-Instruct), same LoRA (r16, all linear layers, trained score head), same
pairs, batch size, learning rate and number of steps. Per data set:
- trl-default: `RewardTrainer(model=<path>, args=RewardConfig(...), peft_config=...)` with RewardConfig's
  defaults for everything that affects speed: fp32 weights under bf16 autocast, gradient checkpointing,
  random batches, chosen and rejected as separate padded sequences;
- trl-bf16:    the same with the weights loaded in bf16 (`model_init_kwargs={"dtype": bf16}`, `bf16=True`);
- prefloop:    `reward.trainer.build_reward_trainer` with its defaults (a batch's pairs packed into one
  row without padding, micro-batches of <= 1024 tokens, bf16 weights with fp32 optimizer copies of
  the LoRA/head, per-sequence attention, no checkpointing, length-grouped batches);
- prefloop-autocast, prefloop-ckpt (only with --methods): `training.mixed_precision=autocast`, or
  `training.gradient_checkpointing=true` (activation checkpointing, as TRL does by default).
Each configuration runs in its own process (so its peak RSS is its own); with --rounds > 1 the order
alternates so a noisy neighbour slows all of them. Training throughput = pairs / second over one pass
over the same `batch x steps` pairs, every step counted (prefloop's length grouping reorders them, so
leaving out a first step would favour one side). Peak RSS = the process's high-water mark at the end
of training (loading included); peak GPU memory beside it on a GPU. Scoring = held-out pairs / second:
TRL's `RewardTrainer.evaluate` for the TRL runs, prefloop's post-training evaluation
(`reward.trainer.evaluate_pairs`: the saved adapter merged, bf16, a pair per packed row) for prefloop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m-instruct"
METHODS = ("trl-default", "trl-bf16", "prefloop")
EXTRA = {
    "prefloop": [],
    "prefloop-autocast": ["training.mixed_precision=autocast"],
    "prefloop-ckpt": ["training.gradient_checkpointing=true"],  # activation checkpointing, like TRL
}
LEARNING_RATE = 5e-4
# Per data set: max_length (prompt + response tokens of a side) and held-out pairs for scoring.
DATASETS = {"bundled": {"max_length": 256}, "long": {"max_length": 512, "eval_pairs": 48}}


def step_timer() -> tuple[list[tuple[float, float]], object]:
    """(wall clock, process CPU time) at the end of each step."""
    from transformers import TrainerCallback

    times: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            times.append((time.perf_counter(), time.process_time()))

    return times, StepTimer()


def trl_trainer(
    args: argparse.Namespace, out: Path, train: object, eval_ds: object, tokenizer: object, bf16: bool
) -> object:
    import torch
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    from alignment.models import resolve_model

    extra = {"model_init_kwargs": {"dtype": torch.bfloat16}} if bf16 else {}
    config = RewardConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        report_to="none",
        save_strategy="no",
        logging_steps=args.steps,
        disable_tqdm=True,
        max_length=DATASETS[args.dataset]["max_length"],
        seed=42,
        use_cpu=not torch.cuda.is_available(),  # HF refuses bf16 autocast on CPU unless told so
        **extra,
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="all-linear",
        task_type="SEQ_CLS",
        modules_to_save=["score"],
    )
    return RewardTrainer(
        model=resolve_model(MODEL),
        args=config,
        train_dataset=train,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora,
    )


def prefloop_trainer(
    args: argparse.Namespace, out: Path, train_path: Path, eval_path: Path, extra: list[str]
) -> object:
    from alignment.config import load_config
    from reward.trainer import RewardRunConfig, build_reward_trainer

    config = load_config(
        RewardRunConfig,
        None,
        [
            f"model={MODEL}",
            f"output_dir={out}",
            f"data.train={train_path}",
            f"data.eval={eval_path}",
            "data.near_dup_threshold=null",
            f"data.max_length={DATASETS[args.dataset]['max_length']}",
            "tracking.report_to=none",
            f"training.learning_rate={LEARNING_RATE}",
            f"training.max_steps={args.steps}",
            f"training.batch_size={args.batch}",
            "training.lr_scheduler=cosine",
            "training.save_steps=100000",
            f"training.logging_steps={args.steps}",
            *extra,
        ],
    )
    return build_reward_trainer(config), config


def bench_data(dataset: str, n_train: int, tokenizer: object) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows in the canonical format; the same for every contender."""
    if dataset == "bundled":
        from alignment.preference_data import PreferenceDataSettings, prepare_preferences

        train, eval_ds, _ = prepare_preferences(PreferenceDataSettings(max_length=256), tokenizer)
        columns = ("prompt", "chosen", "rejected", "id")
        return [{k: r[k] for k in columns} for r in train][:n_train], [
            {k: r[k] for k in columns} for r in eval_ds
        ]
    import random

    from make_long_pairs import long_pairs

    # Drawn with over-long pairs (> max_length, which every trainer drops) left out first.
    rows = long_pairs(3 * (n_train + DATASETS["long"]["eval_pairs"]), seed=0, tokenizer=tokenizer)
    limit = DATASETS["long"]["max_length"]

    def fits(row: dict) -> bool:
        return all(
            len(tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True)["input_ids"]) <= limit
            for side in ("chosen", "rejected")
        )

    random.Random(0).shuffle(rows)
    rows = [r for r in rows if fits(r)]
    return rows[:n_train], rows[n_train : n_train + DATASETS["long"]["eval_pairs"]]


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in status if x.startswith("VmHWM")).split()[1]) / 1024


def worker(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset

    from alignment.data_files import write_jsonl
    from alignment.models import load_tokenizer
    from alignment.preference_data import prepare_preferences
    from alignment.runner import device_plan
    from reward.scorer import RewardScorer
    from reward.trainer import evaluate_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(MODEL)
    train_rows, eval_rows = bench_data(args.dataset, args.batch * args.steps, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        train_path, eval_path = Path(tmp) / "train.jsonl", Path(tmp) / "eval.jsonl"
        write_jsonl(train_path, train_rows)
        write_jsonl(eval_path, eval_rows)
        out = Path(tmp) / "run"
        if args.worker in EXTRA:
            trainer, config = prefloop_trainer(args, out, train_path, eval_path, EXTRA[args.worker])
        else:
            trainer = trl_trainer(
                args,
                out,
                Dataset.from_list(train_rows),
                Dataset.from_list(eval_rows),
                tokenizer,
                bf16=args.worker == "trl-bf16",
            )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times, timer = step_timer()
        trainer.add_callback(timer)
        start = (time.perf_counter(), time.process_time())
        trainer.train()
        train_rss = peak_rss_mib()
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        seconds = times[-1][0] - start[0]
        cpu_seconds = times[-1][1] - start[1]
        pairs = args.batch * len(times)
        # Scoring the held-out pairs: each side's own post-training evaluation.
        if args.worker in EXTRA:
            trainer.save_model(str(out))
            scorer = RewardScorer.from_pretrained(out, device_plan(config), batch_size=16)
            _, eval_ds, _ = prepare_preferences(config.data, tokenizer)
            score_start = time.perf_counter()
            report = evaluate_pairs(scorer, eval_ds)
            score_seconds = time.perf_counter() - score_start
            accuracy, eval_pairs = report["accuracy"], report["pairs"]
        else:
            score_start = time.perf_counter()
            report = trainer.evaluate()
            score_seconds = time.perf_counter() - score_start
            accuracy, eval_pairs = report["eval_accuracy"], len(trainer.eval_dataset)
    result = {
        "method": args.worker,
        "dataset": args.dataset,
        "pairs_per_second": pairs / seconds,
        "pairs_per_cpu_second": pairs / cpu_seconds,
        "seconds_per_step": seconds / len(times),
        "train_tokens": int(trainer._total_train_tokens),
        "peak_rss_mib": train_rss,
        "peak_gpu_mib": gpu_peak,
        "score_pairs_per_second": eval_pairs / score_seconds,
        "accuracy": accuracy,
        "eval_pairs": eval_pairs,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "weights_dtype": str(next(p for p in trainer.model.parameters() if not p.requires_grad).dtype),
    }
    Path(args.out).write_text(json.dumps(result))


def run_worker(method: str, dataset: str, steps: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", method, "--dataset", dataset, "--out", str(out),
        "--steps", str(steps), "--batch", str(args.batch), "--threads", str(args.threads),
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    print(
        f"  {dataset:8s} {method:12s} {result['pairs_per_second']:.3f} pairs/s  "
        f"{result['pairs_per_cpu_second']:.3f} pairs/CPU-s  "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB  scoring {result['score_pairs_per_second']:.2f} pairs/s  "
        f"acc {result['accuracy']:.2f}  (process {time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="Optimizer steps on the bundled set.")
    parser.add_argument("--long-steps", type=int, default=3, help="Optimizer steps on the long set.")
    parser.add_argument("--batch", type=int, default=8, help="Pairs per step (per-device batch size).")
    parser.add_argument("--rounds", type=int, default=1, help="Runs of each method, in alternating order.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in all (0 = torch default).")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--worker", choices=(*METHODS, *EXTRA), help=argparse.SUPPRESS)
    parser.add_argument("--dataset", choices=tuple(DATASETS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    methods = args.methods.split(",")
    datasets = args.datasets.split(",")
    results: dict[tuple[str, str], list[dict]] = {(d, m): [] for d in datasets for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = methods if r % 2 == 0 else methods[::-1]
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for dataset in datasets:
                steps = args.steps if dataset == "bundled" else args.long_steps
                for method in order:
                    out = Path(tmp) / f"{dataset}-{method}-{r}.json"
                    results[dataset, method].append(run_worker(method, dataset, steps, args, out))

    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary: dict[tuple[str, str], dict] = {}
    for dataset in datasets:
        steps = args.steps if dataset == "bundled" else args.long_steps
        table = Table(
            title=f"reward training on {dataset} pairs, {MODEL}, LoRA r16, batch {args.batch}, {steps} steps, "
            f"torch threads {args.threads or 'default'}"
        )
        for col in (
            "method", "pairs/s", "pairs/CPU-s", "s/step", "peak RSS MiB", "peak GPU MiB",
            "scoring pairs/s", "held-out acc", "grad ckpt", "frozen weights",
        ):  # fmt: skip
            table.add_column(col, justify="right")
        for method in methods:
            runs = results[dataset, method]
            s = {
                key: statistics.median(r[key] for r in runs)
                for key in (
                    "pairs_per_second",
                    "pairs_per_cpu_second",
                    "seconds_per_step",
                    "score_pairs_per_second",
                )
            }
            s["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
            gpu = [r["peak_gpu_mib"] for r in runs if r["peak_gpu_mib"] is not None]
            s["peak_gpu_mib"] = max(gpu) if gpu else None
            s["accuracy"] = statistics.mean(r["accuracy"] for r in runs)
            summary[dataset, method] = s
            table.add_row(
                method,
                f"{s['pairs_per_second']:.3f}",
                f"{s['pairs_per_cpu_second']:.3f}",
                f"{s['seconds_per_step']:.2f}",
                f"{s['peak_rss_mib']:.0f}",
                "-" if s["peak_gpu_mib"] is None else f"{s['peak_gpu_mib']:.0f}",
                f"{s['score_pairs_per_second']:.2f}",
                f"{s['accuracy']:.2f} ({runs[0]['eval_pairs']} pairs)",
                str(runs[0]["gradient_checkpointing"]),
                runs[0]["weights_dtype"],
            )
        console.print(table)
        target = 5.0 if dataset == "long" else 4.0
        for method in (m for m in methods if m in EXTRA):
            ours = summary[dataset, method]
            for base in (m for m in methods if m not in EXTRA):
                theirs = summary[dataset, base]
                ratio = ours["pairs_per_second"] / theirs["pairs_per_second"]
                cpu_ratio = ours["pairs_per_cpu_second"] / theirs["pairs_per_cpu_second"]
                rss = theirs["peak_rss_mib"] / ours["peak_rss_mib"]
                score = ours["score_pairs_per_second"] / theirs["score_pairs_per_second"]
                verdict = (
                    f" (target {target:.0f}x: {'met' if ratio >= target else 'MISSED'})"
                    if base == "trl-default"
                    else ""
                )
                console.print(
                    f"{dataset}: {method} vs {base}: training x{ratio:.2f} by wall clock{verdict}, "
                    f"x{cpu_ratio:.2f} by CPU time; peak RSS {ours['peak_rss_mib']:.0f} vs "
                    f"{theirs['peak_rss_mib']:.0f} MiB (x{rss:.2f} smaller); scoring x{score:.2f}"
                    + (" (target 3x on long)" if base == "trl-default" and dataset == "long" else "")
                )
    print(json.dumps({f"{d}/{m}": s for (d, m), s in summary.items()}))


if __name__ == "__main__":
    main()
