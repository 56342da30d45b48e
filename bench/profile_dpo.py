"""Where a prefloop DPO step spends its CPU time: torch.profiler over one step after warm-up.

    OMP_NUM_THREADS=1 python bench/profile_dpo.py [--dataset bundled|long] [--warmup 1] [--rows 30]

Same trainer and pairs as `bench_dpo.py`'s prefloop contender (4 pairs a step, LoRA r16, one thread).
Prints the ops by self CPU time and the step's wall / CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="bundled")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", type=int, default=30, help="Rows of the op table.")
    parser.add_argument("--set", nargs="*", default=[], help="Extra prefloop config overrides.")
    parser.add_argument("--trace", type=Path, help="Also write a Chrome trace here.")
    opts = parser.parse_args()

    import torch
    from bench_dpo import bench_pairs, build_prefloop
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from alignment.data_files import write_jsonl

    torch.set_num_threads(1)

    class ProfileStep(TrainerCallback):
        def __init__(self) -> None:
            self.prof: profile | None = None
            self.wall = self.cpu = 0.0

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            if state.global_step == opts.warmup:
                self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                self.prof.__enter__()
                self.wall, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            if self.prof is not None and state.global_step == opts.warmup + 1:
                self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
                self.prof.__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_jsonl(data, bench_pairs(4 * (opts.warmup + 1), opts.dataset))
        trainer = build_prefloop(data, Path(tmp), opts.warmup + 1, opts.set)
        callback = ProfileStep()
        trainer.add_callback(callback)
        trainer.train()
    assert callback.prof is not None
    print(callback.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=opts.rows))
    print(
        callback.prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=opts.rows
        )
    )
    if opts.trace:
        callback.prof.export_chrome_trace(str(opts.trace))
    print(f"profiled step: {callback.wall:.2f} s wall, {callback.cpu:.2f} s CPU (profiler overhead included)")


if __name__ == "__main__":
    main()
