"""PPO step (issue 13): today's code vs the PPO step before issue 13, measured in the same run.

SmolLM2-135M-Instruct + LoRA r16, bf16, a separate LoRA critic, 16 prompts, 64 new tokens, 2 PPO
epochs of 2 minibatches. Contenders, each in its own process (so each peak RSS is its own):

- before: the PPO step before issue 13: the tree at BASE_REV (the commit before this bench's PPO
  changes) exported from git into a temporary directory and put first on PYTHONPATH, with its
  rollouts sampled by HF `generate` as at ROLLOUT_REV (that commit's `generate_rollouts`, verbatim,
  also exported; the tree at ROLLOUT_REV itself does not import: its rl/models.py needs a helper
  committed later). Between the two commits only the rollouts changed in alignment/rl/;
- now: this checkout.

"now" and "before" run side by side (`--sequential`: one after the other); each times `--warmup` untimed steps (the engine is built and its weights packed in the first one),
then `--steps` steps: wall and process CPU seconds (one thread: the work done, steadier than wall on
a shared machine) per step and per phase. Losses are compared on the same rollouts: the rollouts
"now" sampled are saved and replayed into a fresh "before" trainer (same seed, same minibatch order),
so both see the same data from the same weights and their statistics should agree within bf16 noise.
`--profile` adds a torch.profiler table (by op) of one step of each.
Phases: rollout (sampling), logprobs_values (the no-grad passes: old log-probs, reference, values;
"now" runs the first minibatch's policy pass with grad in its update, where it counts as
policy_update, and the other passes inside the update, counted here), critic_update, policy_update.

    python bench/bench_ppo.py --threads 1 --steps 2
    python bench/bench_ppo.py --threads 1 --steps 1 --only-now   # this checkout alone, for iterating
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE_REV = "ed51ef3"  # the last commit before ppo-perf's changes of alignment/rl/ (issue 13)
ROLLOUT_REV = "a1e4a3f"  # the last commit whose PPO rollouts were sampled by HF generate
STAT_KEYS = (
    "loss/policy",
    "loss/value",
    "objective/kl",
    "policy/entropy",
    "policy/approxkl",
    "policy/clipfrac",
    "policy/grad_norm",
    "value/mean",
    "reward/raw",
)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def reward(prompts: list, responses: list[str]) -> list[float]:
    """Cheap and deterministic: longer answers score higher (up to 200 characters)."""
    return [min(len(r), 200) / 100 for r in responses]


# --- one contender, in its own process ----------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import alignment.rl.ppo_trainer as pt
    from alignment.config import load_config
    from alignment.rl.config import PPORunConfig

    phases: dict[str, list[float]] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.process_time()
            with torch.profiler.record_function(f"phase: {name}"):
                result = fn(*a, **k)
            phases[name] = [*phases.get(name, []), time.process_time() - start]
            return result

        return wrapper

    # A list of the Rollout dataclass, written by this script's own "now" worker a moment ago.
    replay = torch.load(args.replay, weights_only=False) if args.replay else None
    step_index = [0]
    saved: list[Any] = []
    original_rollouts = pt.generate_rollouts
    if args.hf_rollouts:
        from alignment.rl.experience_hf import generate_rollouts as hf_generate_rollouts

        def original_rollouts(
            policy: Any, tokenizer: Any, prompt_ids: Any, prompts: Any, g: Any, engine: Any = None
        ) -> Any:
            return hf_generate_rollouts(policy, tokenizer, prompt_ids, prompts, g)

        pt.rollout_engine = lambda *a, **k: None  # no engine (nor its memory) in the old path

    def rollouts(*a: Any, **k: Any) -> Any:
        if replay is not None:
            return replay[step_index[0]]
        rollout = original_rollouts(*a, **k)
        saved.append(rollout)
        return rollout

    pt.generate_rollouts = timed("rollout", rollouts)
    pt.rollout_logprobs_and_values = timed("logprobs_values", pt.rollout_logprobs_and_values)
    if hasattr(pt, "reference_logprobs"):  # "now": the no-grad passes not saved by the update's first pass
        pt.reference_logprobs = timed("logprobs_values", pt.reference_logprobs)
        rest = timed("logprobs_values_in_update", pt.policy_logprobs_and_values)
        pt.policy_logprobs_and_values = timed("logprobs_values", rest)
        values = timed("logprobs_values_in_update", pt.old_values)
        pt.old_values = timed("logprobs_values", values)
    original_update = pt.PPOTrainer.update

    def update(self: Any, experience: Any) -> Any:
        torch.manual_seed(1000 + step_index[0])  # the same minibatch order in every contender
        return original_update(self, experience)

    pt.PPOTrainer.update = timed("update", update)
    critic_step = timed("critic_update", pt.PPOTrainer.critic_step)
    pt.PPOTrainer.critic_step = critic_step

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"model={args.model}", f"output_dir={tmp}/run", "tracking.report_to=none",
            "training.dtype=bf16", "lora.r=16", "lora.dropout=0.0", "ppo.rollout_batch_size=16",
            "ppo.mini_batch_size=8", "ppo.ppo_epochs=2", "ppo.generation.max_new_tokens=64",
            "ppo.critic=separate", *args.set,
        ]  # fmt: skip
        trainer, prompts, prompt_ids = pt.build_ppo_trainer(
            load_config(PPORunConfig, None, overrides), reward
        )
        steps: list[dict[str, Any]] = []
        total = args.warmup + args.steps
        for step in range(total):
            step_index[0] = step
            phases.clear()
            torch.manual_seed(100 + step)
            batch = [(16 * step + i) % len(prompts) for i in range(16)]
            prof = None
            if args.profile and step == total - 1:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                prof.__enter__()
            start, start_cpu = time.perf_counter(), time.process_time()
            stats = trainer.step([prompts[i] for i in batch], [prompt_ids[i] for i in batch])
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if prof is not None:
                prof.__exit__(None, None, None)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
                print(f"profile of step {step} ({args.name}, wall-clock shares under load):\n{table}")
            row = {
                "step": step,
                "warmup": step < args.warmup,
                "wall_s": wall,
                "cpu_s": cpu,
                "phases_cpu_s": {k: sum(v) for k, v in phases.items()},
                "stats": {k: float(stats[k]) for k in STAT_KEYS if k in stats},
                "load": os.getloadavg()[0],
            }
            steps.append(row)
            print(
                f"{args.name} step {step}{' (warmup)' if row['warmup'] else ''}: {wall:.1f} s wall, "
                f"{cpu:.1f} CPU-s, load {row['load']:.1f}",
                flush=True,
            )
        if args.save_rollouts:
            torch.save(saved, args.save_rollouts)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps({"steps": steps, "peak_rss_mib": peak}))


# --- the comparison ---------------------------------------------------------------------------------


def start_worker(
    name: str, root: Path, out: Path, args: argparse.Namespace, *extra: str
) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(args.threads))
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--name", name, "--out", str(out),
        "--model", args.model, "--threads", str(args.threads), *extra,
    ]  # fmt: skip
    if args.profile:
        cmd.append("--profile")
    print(f"-- {name} ({root}), {uptime()}", flush=True)
    return subprocess.Popen(cmd, cwd=root, env=env), out


def finish(*workers: tuple[subprocess.Popen, Path]) -> list[dict[str, Any]]:
    """Wait for workers (each measures its own process CPU time, so running side by side is fair)."""
    results = []
    for proc, out in workers:
        if proc.wait():
            raise SystemExit(f"worker {proc.args} failed with exit code {proc.returncode}")
        results.append(json.loads(out.read_text()))
    return results


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Median CPU-s, wall and per-phase CPU-s of the timed steps, and the peak RSS."""
    timed = [s for s in result["steps"] if not s["warmup"]]
    phases = {p: median([s["phases_cpu_s"].get(p, 0.0) for s in timed]) for p in timed[0]["phases_cpu_s"]}
    phases["policy_update"] = (
        phases.get("update", 0.0)
        - phases.get("critic_update", 0.0)
        - phases.get("logprobs_values_in_update", 0.0)
    )
    return {
        "cpu_s": median([s["cpu_s"] for s in timed]),
        "wall_s": median([s["wall_s"] for s in timed]),
        "phases_cpu_s": phases,
        "peak_rss_mib": result["peak_rss_mib"],
    }


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--base-rev", default=BASE_REV)
    parser.add_argument("--rollout-rev", default=ROLLOUT_REV)
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of each last step")
    parser.add_argument("--no-losses", action="store_true", help="skip replaying the rollouts into 'before'")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--sequential", action="store_true", help="run the contenders one after the other (less memory)"
    )
    parser.add_argument(
        "--only-now",
        action="store_true",
        help="time this checkout only (quick iteration; no ratio, no losses)",
    )
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for both contenders")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="now", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--save-rollouts", help=argparse.SUPPRESS)
    parser.add_argument("--replay", help=argparse.SUPPRESS)
    parser.add_argument("--hf-rollouts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print("load before:", uptime(), flush=True)
    sets = [a for s in args.set for a in ("--set", s)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        base = tmp / "base"
        base.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.base_rev], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        (base / "alignment/rl/experience_hf.py").write_bytes(
            subprocess.run(
                ["git", "show", f"{args.rollout_rev}:alignment/rl/experience.py"],
                cwd=ROOT, capture_output=True, check=True,
            ).stdout
        )  # fmt: skip
        timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        old = ["--hf-rollouts"]
        now_w = start_worker(
            "now", ROOT, tmp / "now.json", args, *timing, "--save-rollouts", str(tmp / "rollouts.pt"), *sets
        )
        if args.only_now:
            (now,) = finish(now_w)
            print(f"load after: {uptime()}\n{json.dumps(summary(now), indent=2)}")
            return
        if not args.sequential:
            before_w = start_worker("before", base, tmp / "before.json", args, *timing, *old, *sets)
            now, before = finish(now_w, before_w)
        else:
            (now,) = finish(now_w)
            (before,) = finish(start_worker("before", base, tmp / "before.json", args, *timing, *old, *sets))
        replay = None
        if not args.no_losses:
            # The rollouts "now" sampled (warmup included), replayed from the same fresh weights.
            (replay,) = finish(start_worker(
                "before, replaying now's rollouts", base, tmp / "replay.json", args,
                "--steps", str(args.warmup + args.steps), "--warmup", "0", "--replay", str(tmp / "rollouts.pt"), *old,
                *sets,
            ))  # fmt: skip
    print("load after:", uptime())

    def timed(result: dict[str, Any], key: str) -> float:
        return median([s[key] for s in result["steps"] if not s["warmup"]])

    def phase(result: dict[str, Any], name: str) -> float:
        return median([s["phases_cpu_s"].get(name, 0.0) for s in result["steps"] if not s["warmup"]])

    figures: dict[str, Any] = {}
    print(f"\n{'':16}{'wall s/step':>12}{'CPU-s/step':>12}{'peak RSS MiB':>14}   CPU-s by phase")
    for name, result in (("before", before), ("now", now)):
        by_phase = {p: phase(result, p) for p in ("rollout", "logprobs_values", "update", "critic_update")}
        # The update phase of "now" includes the no-grad passes of the rows after its first minibatch.
        in_update = phase(result, "logprobs_values_in_update")
        by_phase["policy_update"] = by_phase.pop("update") - by_phase["critic_update"] - in_update
        figures[name] = {
            "wall_s": timed(result, "wall_s"),
            "cpu_s": timed(result, "cpu_s"),
            "peak_rss_mib": result["peak_rss_mib"],
            "phases_cpu_s": by_phase,
            "steps": result["steps"],
        }
        phases = "  ".join(f"{k} {v:.1f}" for k, v in by_phase.items())
        print(
            f"{name:16}{figures[name]['wall_s']:>12.1f}{figures[name]['cpu_s']:>12.1f}"
            f"{result['peak_rss_mib']:>14.0f}   {phases}"
        )
    ratio_cpu = figures["before"]["cpu_s"] / figures["now"]["cpu_s"]
    ratio_wall = figures["before"]["wall_s"] / figures["now"]["wall_s"]
    figures["ratio"] = {"cpu": ratio_cpu, "wall": ratio_wall}
    print(f"PPO step: now x{ratio_cpu:.2f} by CPU time, x{ratio_wall:.2f} by wall clock vs before")
    if replay is not None:
        print("\nsame rollouts, same starting weights (before replaying now's samples | now):")
        diffs: dict[str, float] = {}
        for a, b in zip(replay["steps"], now["steps"], strict=True):
            cells = []
            for key in STAT_KEYS:
                if key in a["stats"] and key in b["stats"]:
                    x, y = a["stats"][key], b["stats"][key]
                    diffs[key] = max(diffs.get(key, 0.0), abs(x - y))
                    cells.append(f"{key} {x:.4f} | {y:.4f}")
            print(f"  step {a['step']}: " + ",  ".join(cells))
        print("  max |difference|: " + ", ".join(f"{k} {v:.4f}" for k, v in diffs.items()))
        figures["loss_diff"] = diffs
        figures["replay"] = replay["steps"]
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
