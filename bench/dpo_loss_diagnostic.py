"""Why prefloop's and TRL's DPO losses differ step by step on the bench pairs: a side-by-side diagnostic.

    PREFLOOP_HOME=/tmp/pfhome OMP_NUM_THREADS=1 python bench/dpo_loss_diagnostic.py [--datasets long]

Builds `bench_dpo.py`'s contenders (TRL defaults, TRL bf16, prefloop) on the same pairs, each in its
own process, and without training compares what decides their step-k losses:
- the pairs of each step (the sampler's order) and their token ids (tokenization, truncation);
- the freshly initialised LoRA weights (A is random, B zero: step 0's loss is log 2 whatever A is,
  but step 1's update, and so every later loss, depends on A);
- each pair's chosen / rejected log-probs at initialisation, through each contender's own forward.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONTENDERS = ("trl-default", "trl-bf16", "prefloop")


def lora_state(model) -> dict[str, list[float]]:
    """A few statistics of each LoRA tensor of the trainable adapter (enough to tell inits apart)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name and p.requires_grad:
            t = p.detach().float()
            out[name.replace(".default", "")] = [t.sum().item(), t.abs().sum().item(), t.flatten()[0].item()]
    return out


def worker(method: str, data: Path, steps: int, result: Path) -> None:
    import torch
    from bench_dpo import build_prefloop, build_trl

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if method == "prefloop":
            trainer = build_prefloop(data, Path(tmp), steps, [])
        else:
            trainer = build_trl(method, data, Path(tmp), steps)
        lora = lora_state(trainer.model)
        batches, logps = [], []

        def record(model_, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            mask = inputs["attention_mask"]
            rows = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
            batches.append([hashlib.sha256(json.dumps(r).encode()).hexdigest()[:12] for r in rows])
            with torch.no_grad():
                # at init the policy is the reference (LoRA B is zero): each contender's own forward
                chosen, rejected = trainer.compute_ref_log_probs(model_, inputs)
            entry = {
                "ref_chosen": chosen.float().tolist(),
                "ref_rejected": rejected.float().tolist(),
                "lengths": [len(r) for r in rows],
            }
            if "ref_chosen_logps" in inputs:
                entry["cached_chosen"] = inputs["ref_chosen_logps"].float().tolist()
                entry["cached_rejected"] = inputs["ref_rejected_logps"].float().tolist()
            logps.append(entry)
            return torch.zeros((), requires_grad=True)

        trainer.compute_loss = record
        trainer.train()
    result.write_text(json.dumps({"method": method, "lora": lora, "batches": batches, "logps": logps}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default="long")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default=",".join(CONTENDERS))
    parser.add_argument("--worker")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--result", type=Path)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker, opts.data, opts.steps, opts.result)
        return
    from bench_dpo import bench_pairs

    from alignment.data_files import write_jsonl

    for dataset in opts.datasets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "pairs.jsonl"
            write_jsonl(data, bench_pairs(4 * opts.steps, dataset))
            results = {}
            for method in opts.methods.split(","):
                out = Path(tmp) / f"{method}.json"
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    method,
                    "--data",
                    str(data),
                    "--result",
                    str(out),
                    "--steps",
                    str(opts.steps),
                ]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode:
                    raise SystemExit(f"{method} failed:\n{run.stderr[-4000:]}")
                results[method] = json.loads(out.read_text())
        report(dataset, results)


def report(dataset: str, results: dict[str, dict]) -> None:
    methods = list(results)
    base = results[methods[0]]
    print(f"== {dataset}")
    for m in methods[1:]:
        r = results[m]
        same_batches = r["batches"] == base["batches"]
        print(f"{m} vs {methods[0]}: same rows (token ids) every step: {same_batches}")
        if not same_batches:
            for k, (a, b) in enumerate(zip(base["batches"], r["batches"], strict=False)):
                print(f"  step {k}: {sum(x == y for x, y in zip(a, b, strict=False))}/{len(a)} rows equal")
        names = sorted(set(r["lora"]) & set(base["lora"]))
        diff = max((abs(r["lora"][n][1] - base["lora"][n][1]) for n in names), default=float("nan"))
        a_names = [n for n in names if "lora_A" in n]
        print(
            f"  LoRA tensors in common {len(names)} (of {len(base['lora'])} / {len(r['lora'])}); "
            f"max |sum|A|| difference {diff:.4g}; first A element {base['lora'][a_names[0]][2]:.6f} vs "
            f"{r['lora'][a_names[0]][2]:.6f}"
            if a_names
            else "  no LoRA A tensors"
        )
        for side in ("chosen", "rejected"):
            d = [
                abs(x - y)
                for sa, sb in zip(base["logps"], r["logps"], strict=False)
                for x, y in zip(sa[f"ref_{side}"], sb[f"ref_{side}"], strict=False)
            ]
            print(
                f"  reference {side} log-probs at init: max |diff| {max(d):.4f}, mean {sum(d) / len(d):.4f}"
            )
    for m in methods:
        r = results[m]
        for key in ("cached",):
            if f"{key}_chosen" in r["logps"][0]:
                for side in ("chosen", "rejected"):
                    d = [
                        abs(x - y)
                        for s in r["logps"]
                        for x, y in zip(s[f"{key}_{side}"], s[f"ref_{side}"], strict=False)
                    ]
                    print(f"  {m}: {key} {side} vs its own reference forward: max |diff| {max(d):.4f}")


if __name__ == "__main__":
    main()
