"""Reward-model training throughput: prefloop's reward trainer vs TRL's RewardTrainer with its defaults.

    PREFLOOP_HOME=/tmp/pfhome python bench/bench_reward.py [--steps 8] [--batch 8] [--rounds 1] [--threads 1]

Same model (SmolLM2-135M-Instruct), same LoRA (r16, all linear layers, trained score head), same
pairs (the bundled house-style set, train split), same batch size, learning rate and number of steps.
- trl-default: `RewardTrainer(model=<path>, args=RewardConfig(...), peft_config=...)` with RewardConfig's
  defaults for everything that affects speed: fp32 weights under bf16 autocast, gradient checkpointing,
  random batches;
- prefloop:    `reward.trainer.build_reward_trainer` with its defaults (one packed row per pair, bf16
  weights with fp32 optimizer copies of the LoRA/head, no autocast, no checkpointing, eager attention
  on CPU, length-grouped batches);
- prefloop-autocast: the same with `training.mixed_precision=autocast` (fp32 LoRA/head under bf16 autocast).
Each runs in its own process; with --rounds > 1 the order alternates so a noisy neighbour slows both.
Throughput = pairs / second over the steps after the first `--warmup`, by wall clock and by process
CPU time (with --threads 1 the latter barely depends on what else the machine runs); accuracy = pairwise accuracy
of the trained model on the held-out split (30 pairs), scored by the same `RewardScorer` code.
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
METHODS = ("trl-default", "prefloop", "prefloop-autocast")
LEARNING_RATE = 5e-4


def step_timer() -> tuple[list[tuple[float, float]], object]:
    """(wall clock, process CPU time) at the end of each step."""
    from transformers import TrainerCallback

    times: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            times.append((time.perf_counter(), time.process_time()))

    return times, StepTimer()


def trl_default_trainer(args: argparse.Namespace, out: Path, train: object, tokenizer: object) -> object:
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    from alignment.models import resolve_model

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
        max_length=256,
        seed=42,
        use_cpu=True,  # HF refuses bf16 autocast on CPU unless told the CPU is intended
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
        processing_class=tokenizer,
        peft_config=lora,
    )


def prefloop_trainer(args: argparse.Namespace, out: Path, extra: list[str]) -> object:
    from alignment.config import load_config
    from reward.trainer import RewardRunConfig, build_reward_trainer

    config = load_config(
        RewardRunConfig,
        None,
        [
            f"model={MODEL}",
            f"output_dir={out}",
            "data.max_length=256",
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
    return build_reward_trainer(config)


def worker(args: argparse.Namespace) -> None:
    import torch

    from alignment.models import load_tokenizer
    from alignment.preference_data import PreferenceDataSettings, prepare_preferences
    from reward.scorer import RewardScorer
    from reward.trainer import evaluate_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(MODEL)
    train, eval_ds, _ = prepare_preferences(PreferenceDataSettings(max_length=256), tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "prefloop":
            trainer = prefloop_trainer(args, Path(tmp), [])
        elif args.worker == "prefloop-autocast":
            trainer = prefloop_trainer(args, Path(tmp), ["training.mixed_precision=autocast"])
        else:
            trainer = trl_default_trainer(args, Path(tmp), train, tokenizer)
        times, timer = step_timer()
        trainer.add_callback(timer)
        trainer.train()
    timed = times[args.warmup - 1 :]
    seconds = timed[-1][0] - timed[0][0]
    cpu_seconds = timed[-1][1] - timed[0][1]
    pairs = args.batch * (len(timed) - 1)
    model = trainer.model.eval()
    scorer = RewardScorer(model, trainer.processing_class, batch_size=16, max_length=256)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # both models scored the same way
        report = evaluate_pairs(scorer, eval_ds)
    result = {
        "method": args.worker,
        "pairs_per_second": pairs / seconds,
        "pairs_per_cpu_second": pairs / cpu_seconds,
        "seconds_per_step": seconds / (len(timed) - 1),
        "accuracy": report["accuracy"],
        "eval_pairs": report["pairs"],
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "weights_dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype),
    }
    Path(args.out).write_text(json.dumps(result))


def run_worker(method: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", method, "--out", str(out), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--batch", str(args.batch), "--threads", str(args.threads),
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    print(
        f"  {method:12s} {result['pairs_per_second']:.3f} pairs/s  "
        f"{result['pairs_per_cpu_second']:.3f} pairs/CPU-s  acc {result['accuracy']:.2f}  "
        f"(process {time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per run (warmup included).")
    parser.add_argument("--warmup", type=int, default=1, help="Steps left out of the timing (>= 1).")
    parser.add_argument("--batch", type=int, default=8, help="Pairs per step (per-device batch size).")
    parser.add_argument("--rounds", type=int, default=1, help="Runs of each method, in alternating order.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in both (0 = torch default).")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = METHODS if r % 2 == 0 else METHODS[::-1]
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for method in order:
                results[method].append(run_worker(method, args, Path(tmp) / f"{method}-{r}.json"))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reward training, {MODEL}, LoRA r16, batch {args.batch} pairs, {args.steps} steps")
    columns = ("method", "pairs/s", "pairs/CPU-s", "s/step", "held-out acc", "grad ckpt", "frozen weights")
    for col in columns:
        table.add_column(col)
    summary = {}
    for method, runs in results.items():
        pps = statistics.median(r["pairs_per_second"] for r in runs)
        ppcs = statistics.median(r["pairs_per_cpu_second"] for r in runs)
        acc = statistics.mean(r["accuracy"] for r in runs)
        summary[method] = {"pairs_per_second": pps, "pairs_per_cpu_second": ppcs, "accuracy": acc}
        table.add_row(
            method,
            f"{pps:.3f}",
            f"{ppcs:.3f}",
            f"{statistics.median(r['seconds_per_step'] for r in runs):.2f}",
            f"{acc:.2f} ({runs[0]['eval_pairs']} pairs)",
            str(runs[0]["gradient_checkpointing"]),
            runs[0]["weights_dtype"],
        )
    Console().print(table)
    for method in METHODS[1:]:
        for key, what in (("pairs_per_second", "wall clock"), ("pairs_per_cpu_second", "CPU time")):
            ratio = summary[method][key] / summary["trl-default"][key]
            verdict = "meets" if ratio >= 4 else "misses"
            print(f"speedup {method} / trl-default by {what}: {ratio:.2f}x ({verdict} the 4x target)")
    accuracies = ", ".join(f"{m} {summary[m]['accuracy']:.2f}" for m in METHODS)
    print(f"held-out accuracy ({results['prefloop'][0]['eval_pairs']} pairs): {accuracies}")


if __name__ == "__main__":
    main()
