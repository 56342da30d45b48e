"""SFT throughput on SmolLM2-135M + LoRA: fp32 vs bf16 in one run, printed as a ratio.

    python bench/bench_sft.py [--steps 8] [--batch-size 8]

Both runs use the same data, batch, LoRA and step count; the first `--warmup` steps are excluded.
Tokens are TRL's own `num_tokens` counter (non-padding tokens seen).
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table
from transformers import TrainerCallback

from alignment.config import load_config
from alignment.sft import SFTRunConfig, build_sft_trainer


class StepClock(TrainerCallback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def measure(dtype: str, steps: int, warmup: int, batch_size: int, output: str) -> dict[str, float]:
    cfg = load_config(
        SFTRunConfig,
        None,
        [
            "model=smollm2-135m-instruct",
            f"output_dir={output}/{dtype}",
            f"training.dtype={dtype}",
            f"training.max_steps={steps + warmup}",
            f"training.batch_size={batch_size}",
            "training.logging_steps=1",
            "training.save_steps=100000",
            "data.eval_fraction=0",
            "tracking.report_to=none",
        ],
    )
    trainer = build_sft_trainer(cfg)
    clock = StepClock(warmup)
    trainer.add_callback(clock)
    trainer.train()
    tokens = {log["step"]: log["num_tokens"] for log in trainer.state.log_history if "num_tokens" in log}
    seen = tokens[steps + warmup] - tokens[warmup]
    seconds = clock.end - clock.start
    return {"tokens_per_s": seen / seconds, "s_per_step": seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="/tmp/prefloop-bench-sft")
    args = parser.parse_args()
    results = {d: measure(d, args.steps, args.warmup, args.batch_size, args.output) for d in ("fp32", "bf16")}
    table = Table(title=f"SFT SmolLM2-135M + LoRA r16, batch {args.batch_size}, {args.steps} timed steps")
    for col in ("dtype", "tokens/s", "s/step", "vs fp32"):
        table.add_column(col, justify="right")
    for dtype, r in results.items():
        ratio = r["tokens_per_s"] / results["fp32"]["tokens_per_s"]
        table.add_row(dtype, f"{r['tokens_per_s']:.0f}", f"{r['s_per_step']:.2f}", f"{ratio:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
