"""DPO throughput and peak memory: prefloop's DPO vs TRL's DPOTrainer, same model, data and batch.

    PREFLOOP_HOME=/tmp/pfhome python bench/bench_dpo.py --threads 1 [--steps 5] [--rounds 2] [--datasets bundled,long]

Two data sets: the bundled house-style pairs (~75 tokens a side, one turn, one system prompt) and long
multi-turn pairs from `bench/make_long_pairs.py` (prompt p50 124 tokens, up to 512 a side).

Three contenders, each in its own process (so peak RSS is its own), run in alternating order over
`--rounds` rounds (so a noisy neighbour slows all of them, not one):
- trl-default: DPOTrainer as shipped (DPOConfig defaults: fp32 weights under bf16 autocast, gradient
  checkpointing, a reference forward every step), LoRA r16 on all linear layers;
- trl-bf16:    the same with the weights loaded in bf16 and `bf16=True`;
- prefloop:    `alignment.dpo.build_dpo_trainer` (bf16 weights with fp32 optimizer copies of the LoRA,
  no autocast, no checkpointing, cached reference log-probs, pairs packed with the batch's shared
  system prompt once per row and per-sequence attention, completion-only LM head);
- prefloop-autocast (only with --methods): the same with `training.mixed_precision=autocast`;
- trl-fp32, prefloop-fp32 (only with --methods): both in fp32 without autocast, the like-with-like
  loss check: in bf16 the per-step losses of any two contenders differ by bf16 noise (see README).
Peak RSS is each process's high-water mark (and peak GPU memory on a GPU).
Throughput counts prompt+response tokens of chosen and rejected (no padding). Model FLOPs
utilisation uses the bf16 matmul peak measured in this run; model FLOPs per token = 4 * params
(forward 2N + activation gradients 2N: LoRA leaves the frozen weights without weight gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    "prefloop-fp32": ["training.dtype=fp32"],
}
LEARNING_RATE = 5e-5  # large enough that the losses of later steps move away from log(2)


def long_bench_pairs(n_pairs: int) -> list[dict]:
    """Long multi-turn pairs (bench/make_long_pairs.py), a random draw of those within 512 tokens a side."""
    import random

    from make_long_pairs import long_pairs

    from alignment.models import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    rows = long_pairs(3 * n_pairs, seed=0, tokenizer=tokenizer)
    random.Random(0).shuffle(rows)

    def fits(row: dict) -> bool:
        return all(
            len(tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True)["input_ids"]) <= 512
            for side in ("chosen", "rejected")
        )

    return [r for r in rows if fits(r)][:n_pairs]


def bench_pairs(n_pairs: int, dataset: str = "bundled") -> list[dict]:
    """Bundled house-style pairs of about 75 tokens (prompt + response) each, or long multi-turn pairs."""
    from alignment.models import load_tokenizer
    from alignment.preference_data import PreferenceDataSettings, prepare_preferences

    if dataset == "long":
        return long_bench_pairs(n_pairs)
    tokenizer = load_tokenizer(MODEL)
    train, _, _ = prepare_preferences(PreferenceDataSettings(eval_fraction=0), tokenizer)

    def length(row: dict, side: str) -> int:
        ids = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True)
        return len(ids["input_ids"] if isinstance(ids, dict) else ids)

    # The pairs whose two sequences are closest to 75 tokens on average, in file order.
    closest = sorted(
        range(len(train)), key=lambda i: abs(length(train[i], "chosen") + length(train[i], "rejected") - 150)
    )
    rows = [train[i] for i in sorted(closest[:n_pairs])]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected", "id")} for r in rows[:n_pairs]]


def bf16_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def model_params() -> int:
    """Parameters a token passes through: every weight but the input embedding (the tied head counts)."""
    from alignment.models import load_causal_lm

    model = load_causal_lm(MODEL)
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding + head


def build_trl(method: str, data_path: Path, out: Path, steps: int):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from alignment.data_files import read_jsonl
    from alignment.models import load_tokenizer, resolve_model

    path = resolve_model(MODEL)
    rows = [row for _, row in read_jsonl(data_path)]
    extra = {
        "trl-default": {},
        "trl-bf16": {"model_init_kwargs": {"dtype": torch.bfloat16}, "bf16": True},
        # fp32 throughout (no autocast): the loss comparison without bf16 noise. Checkpointing off only
        # makes it faster; it recomputes the same fp32 numbers.
        "trl-fp32": {
            "model_init_kwargs": {"dtype": torch.float32},
            "bf16": False,
            "gradient_checkpointing": False,
        },
    }[method]
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        max_length=512,
        **extra,
    )
    return DPOTrainer(
        model=path,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(path),
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )


def build_prefloop(data_path: Path, out: Path, steps: int, extra: list[str]):
    from alignment.config import load_config
    from alignment.dpo import DPORunConfig, build_dpo_trainer
    from alignment.models import resolve_model

    config = load_config(
        DPORunConfig,
        overrides=[
            f"model={resolve_model(MODEL)}",
            f"output_dir={out}",
            f"data.train={data_path}",
            "data.eval_fraction=0",
            "data.near_dup_threshold=null",
            "data.max_length=512",
            "training.batch_size=4",
            f"training.max_steps={steps}",
            f"training.learning_rate={LEARNING_RATE}",
            "training.lr_scheduler=linear",  # TRL's default, so the losses are comparable step by step
            "training.logging_steps=1",
            "training.save_steps=100000",
            "lora.r=16",
            "lora.alpha=32",
            "lora.dropout=0.0",
            "tracking.report_to=none",
            f"dpo.reference_cache_dir={out / 'reference-cache'}",  # empty: the precompute is timed
            *extra,
        ],
    )
    return build_dpo_trainer(config)


def worker(method: str, data_path: Path, warmup: int, steps: int, threads: int | None) -> dict:
    """Train one contender and report step times, tokens, losses and peak RSS."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self.tokens: list[int] = []
            self.losses: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            self._start = time.perf_counter()
            self._cpu_start = time.process_time()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.process_time() - self._cpu_start)
            self.tokens.append(trainer._total_train_tokens)

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if method in EXTRA:
            trainer = build_prefloop(data_path, Path(tmp), warmup + steps, EXTRA[method])
        else:
            trainer = build_trl(method, data_path, Path(tmp), warmup + steps)
        setup = time.perf_counter() - start
        timer = StepTimer()
        trainer.add_callback(timer)
        peak = bf16_peak_gflops()  # measured in every worker: the neighbours' load changes it
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark: training peak only
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        train_peak_kib = int(
            next(
                x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM")
            ).split()[1]
        )
    tokens = [b - a for a, b in zip([0, *timer.tokens], timer.tokens, strict=False)]
    return {
        "method": method,
        "setup_s": setup,
        "bf16_peak_gflops": peak,
        "step_s": timer.times[warmup:],
        "step_cpu_s": timer.cpu_times[warmup:],
        "tokens_per_step": tokens[warmup:],
        "losses": timer.losses,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_peak_rss_mib": train_peak_kib / 1024,
        "peak_gpu_mib": gpu_peak,
    }


def run_worker(method: str, data_path: Path, warmup: int, steps: int, threads: int | None) -> dict:
    out = data_path.with_name(f"{method}.json")
    cmd = [sys.executable, __file__, "--worker", method, "--data", str(data_path), "--result", str(out)]
    cmd += ["--warmup", str(warmup), "--steps", str(steps)] + (["--threads", str(threads)] if threads else [])
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per run.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--datasets", default="bundled,long", help="bundled and/or long (make_long_pairs.py)."
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for every contender (default: torch's). On a shared 2-core box, 1 avoids "
        "OpenMP barriers waiting on a descheduled thread, which slows elementwise ops several-fold.",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        opts.result.write_text(
            json.dumps(worker(opts.worker, opts.data, opts.warmup, opts.steps, opts.threads))
        )
        return

    for dataset in opts.datasets.split(","):
        bench_dataset(dataset, opts)


def bench_dataset(dataset: str, opts: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from alignment.data_files import write_jsonl

    console = Console()
    methods = opts.methods.split(",")
    n_pairs = 4 * (opts.warmup + opts.steps)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "pairs.jsonl"
        write_jsonl(data_path, bench_pairs(n_pairs, dataset))
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for round_ in range(opts.rounds):
            order = methods if round_ % 2 == 0 else methods[::-1]
            for method in order:
                console.print(f"round {round_ + 1}/{opts.rounds}: {method} ...")
                runs[method].append(run_worker(method, data_path, opts.warmup, opts.steps, opts.threads))
    peak = max(r["bf16_peak_gflops"] for results in runs.values() for r in results)
    flops_per_token = 4 * model_params()

    summary: dict[str, dict] = {}
    for method, results in runs.items():
        step_s = statistics.median(t for r in results for t in r["step_s"])
        tokens = statistics.mean(t for r in results for t in r["tokens_per_step"])
        summary[method] = {
            "s_per_step": step_s,
            "tokens_per_s": tokens / step_s,
            "tokens_per_cpu_s": tokens / statistics.median(t for r in results for t in r["step_cpu_s"]),
            "peak_gpu_mib": max((r["peak_gpu_mib"] or 0) for r in results) or None,
            "tokens_per_step": tokens,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
            "train_peak_rss_mib": max(r["train_peak_rss_mib"] for r in results),
            "mfu": tokens * flops_per_token / step_s / (peak * 1e9),
            "losses": results[0]["losses"],
            "setup_s": statistics.mean(r["setup_s"] for r in results),
        }
    threads = opts.threads or "default"
    table = Table(
        title=f"DPO on {dataset} pairs, {MODEL} + LoRA r16, 4 pairs/step, torch threads {threads}, bf16 matmul peak {peak:.0f} GFLOP/s"
    )
    for col in (
        "method",
        "s/step",
        "tokens/s",
        "tokens/CPU-s",
        "tokens/step",
        "peak RSS MiB",
        "training peak MiB",
        "peak GPU MiB",
        "MFU",
        "setup s",
    ):
        table.add_column(col, justify="right")
    for method, s in summary.items():
        table.add_row(
            method,
            f"{s['s_per_step']:.2f}",
            f"{s['tokens_per_s']:.0f}",
            f"{s['tokens_per_cpu_s']:.0f}",
            f"{s['tokens_per_step']:.0f}",
            f"{s['peak_rss_mib']:.0f}",
            f"{s['train_peak_rss_mib']:.0f}",
            "-" if s["peak_gpu_mib"] is None else f"{s['peak_gpu_mib']:.0f}",
            f"{s['mfu']:.1%}",
            f"{s['setup_s']:.1f}",
        )
    console.print(table)
    if "prefloop" in summary:
        ours = summary["prefloop"]
        targets = {"trl-default": 6.0 if dataset == "bundled" else 4.0, "trl-bf16": 0.0}
        for method, target in targets.items():
            if method not in summary:
                continue
            base = summary[method]
            ratio = ours["tokens_per_s"] / base["tokens_per_s"]
            mem = base["train_peak_rss_mib"] / ours["train_peak_rss_mib"]
            cpu_ratio = ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
            deltas = [abs(a - b) for a, b in zip(ours["losses"], base["losses"], strict=False)]
            verdict = f" (target x{target:.0f}: {'met' if ratio >= target else 'MISSED'})" if target else ""
            console.print(
                f"{dataset}: prefloop vs {method}: throughput x{ratio:.2f}{verdict}, x{cpu_ratio:.2f} by CPU time, "
                f"training peak RSS x{mem:.2f} smaller, max |loss diff| over {len(deltas)} steps "
                f"{max(deltas, default=float('nan')):.4f}"
            )
        if "trl-default" in summary:
            # The reference precompute runs at setup; charge all of it to one epoch over these pairs.
            base = summary["trl-default"]
            n_steps = opts.warmup + opts.steps
            precompute = max(0.0, ours["setup_s"] - base["setup_s"])
            ratio = (n_steps * base["s_per_step"]) / (n_steps * ours["s_per_step"] + precompute)
            console.print(
                f"one epoch of these {4 * n_steps} pairs, prefloop's reference precompute included "
                f"({precompute:.1f} s, the extra setup time): x{ratio:.2f} vs trl-default"
            )
    if "prefloop-fp32" in summary and "trl-fp32" in summary:
        deltas = [
            abs(a - b)
            for a, b in zip(summary["prefloop-fp32"]["losses"], summary["trl-fp32"]["losses"], strict=False)
        ]
        console.print(
            f"{dataset}: fp32 prefloop vs fp32 TRL: max |loss diff| over {len(deltas)} steps "
            f"{max(deltas, default=float('nan')):.2e}"
        )
    console.print(f"losses: { {m: [round(x, 4) for x in s['losses']] for m, s in summary.items()} }")
    print(
        json.dumps(
            {"dataset": dataset, "bf16_peak_gflops": peak, "flops_per_token": flops_per_token, **summary}
        )
    )


if __name__ == "__main__":
    main()
