"""SFT throughput on Ray Train: 1 vs 2 workers on the same global batch, against a local run, as ratios.

    python bench/bench_ray.py [--model smollm2-135m-instruct] [--steps 8] [--global-batch 8]

Three runs of the same config (data, LoRA, steps, global batch), one after the other:
  local     this process, no Ray, torch on every core (and again on one thread)
  ray x1    one Ray worker holding every core
  ray x2    two Ray workers, one core each, DDP over gloo, half the batch each
`samples/s` is HF's `train_samples_per_second` (global samples over `train()`'s wall time, so after
the workers are up); `wall s` also counts starting the workers and loading the model. On a 2-core
machine two workers split the same cores, so expect ~1x at best: DDP pays off with more cores or GPUs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray
import torch
from rich.console import Console
from rich.table import Table

from alignment.config import load_config
from alignment.sft import SFTRunConfig, train_sft


def measure(model: str, output: str, steps: int, batch: int, *distributed: str) -> dict[str, float]:
    cfg = load_config(
        SFTRunConfig,
        None,
        [
            f"model={model}",
            f"output_dir={output}",
            f"training.max_steps={steps}",
            f"training.batch_size={batch}",
            "training.save_steps=100000",
            "training.logging_steps=1",
            "data.eval_fraction=0",
            "data.max_length=256",
            "tracking.report_to=none",
            *distributed,
        ],
    )
    start = time.perf_counter()
    metrics = train_sft(cfg)
    return {"samples_per_s": metrics["train_samples_per_second"], "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)

    batch = args.global_batch
    runs = {
        "local": (batch,),
        # Isolates what the 2-worker run gains from each process using one thread: on a busy machine
        # a descheduled OpenMP thread stalls its sibling, which single-threaded workers never suffer.
        "local 1 thread": (batch,),
        "ray x1": (batch, "distributed.backend=ray", f"distributed.resources_per_worker={{CPU: {cores}}}"),
        "ray x2": (
            batch // 2,
            "distributed.backend=ray",
            "distributed.num_workers=2",
            f"distributed.resources_per_worker={{CPU: {max(cores // 2, 1)}}}",
        ),
    }
    results = {}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (per_worker_batch, *distributed) in runs.items():
            Console(stderr=True).print(f"[bold]{name}[/]: {args.steps} steps, global batch {batch}")
            torch.set_num_threads(1 if name == "local 1 thread" else threads)
            out = f"{tmp}/{name.replace(' ', '')}"
            results[name] = measure(args.model, out, args.steps, per_worker_batch, *distributed)
    ray.shutdown()

    table = Table(title=f"SFT on Ray, {args.model}, {cores} cores, global batch {batch}, {args.steps} steps")
    for column in ("run", "samples/s", "vs local", "vs ray x1", "wall s"):
        table.add_column(column, justify="right")
    base, one = results["local"]["samples_per_s"], results["ray x1"]["samples_per_s"]
    for name, r in results.items():
        s = r["samples_per_s"]
        table.add_row(name, f"{s:.2f}", f"{s / base:.2f}x", f"{s / one:.2f}x", f"{r['wall_s']:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
