"""Decode throughput of the generation engine vs Hugging Face `generate`, in the same run.

    python bench/bench_generation.py [--model smollm2-135m-instruct] [--batch 16] [--new-tokens 128]
        [--lora-r 16] [--repeats 2] [--threads 1] [--device auto] [--profile]

The policy is the model + a random LoRA (r16, all projections) in bf16, as PPO samples it.
Rows, each `--batch` prompts x `--new-tokens` tokens (EOS ignored, so every row runs the full
length), timed alternately so both sides see the same machine load:

- hf: today's path, `PeftModel.generate` (top_p 0.9, temperature 0.8);
- engine: `alignment.generation.Engine` as the server runs it, every row naming the adapter:
  a batch with one adapter for every row decodes on the engine's cached merged bf16 copy of
  the weights (built once per adapter, outside the timing; `Engine(merged_copies=...)`);
- engine-perrow: the same engine with that cache off (`merged_copies=0`): per-row LoRA on the
  shared base weights (the fused layout that mixed-adapter batches use);
- engine-merged: the same engine after `merge("a0")` (PPO rollouts, push, eval; the same
  merged copy, the rows then carry no adapter);
- hf-mixed / engine-mixed: rows split over two adapters and the base model (the server's case;
  HF via PEFT's `adapter_names`).

Also reported: the log-prob drift of each engine variant against a separate HF forward pass of
the unmerged policy over the same sampled tokens (max and mean |difference|, nats), beside the
same drift of HF `generate`'s own step logits (the bf16 noise floor), and the engine's KV-cache
size. Times are wall and process CPU time (one thread: the work done, whatever the neighbours).
`--profile` prints the torch profiler's top operators for one HF and one engine decode of 16
tokens. The PPO step is bench/bench_ppo.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(model_name: str, device: str, lora_r: int, adapters: int = 2):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    from alignment.devices import plan_device
    from alignment.models import load_causal_lm, load_tokenizer

    plan = plan_device("bf16", device=None if device == "auto" else device)
    base = load_causal_lm(model_name, plan).eval()
    torch.manual_seed(0)
    config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config)
    model.to(plan.dtype).eval()
    model.set_adapter("a0")
    return model, load_tokenizer(model_name), plan


def prompts_for(tokenizer, batch: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    topics = [
        "the sea",
        "a small robot",
        "bread",
        "winter in a city",
        "a lost key",
        "chess",
        "rain",
        "trains",
    ]
    out = []
    for i in range(batch):
        messages = [
            {
                "role": "user",
                "content": f"Write a long story about {topics[i % len(topics)]}." + " Please." * (i % 3),
            }
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def hf_generate(model, tokenizer, prompts, new_tokens, adapter_names=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    tokenizer.padding_side = "left"
    enc = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
    extra = {"adapter_names": adapter_names} if adapter_names else {}
    with torch.inference_mode():
        return model.generate(
            **enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_p=0.9,
            temperature=0.8, top_k=0, pad_token_id=tokenizer.pad_token_id, **extra,
        )  # fmt: skip


def hf_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ids = torch.tensor([prompt + tokens], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens, device=ids.device)[:, None]).squeeze(1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-adapter rows")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from alignment.generation import Engine, SamplingParams

    print("load before:", uptime(), flush=True)
    model, tokenizer, plan = build(args.model, args.device, args.lora_r)
    prompts = prompts_for(tokenizer, args.batch)
    params = SamplingParams(
        temperature=0.8, top_p=0.9, max_tokens=args.new_tokens, ignore_eos=True, logprobs=True
    )
    # One engine for every engine row (a second would pack the weights again: +270 MB RSS).
    engine = Engine(model, tokenizer, max_batch_size=args.batch)
    copies = engine.merged_copies

    def per_row():  # type: ignore[no-untyped-def]
        engine.merged_copies = 0
        try:
            return engine.generate(prompts, params, "a0", generator=gen)
        finally:
            engine.merged_copies = copies

    def merged():  # type: ignore[no-untyped-def]
        engine.merge("a0")  # a cache hit after the warm-up: no work
        try:
            return engine.generate(prompts, params, "a0", generator=gen)
        finally:
            engine.merge(None)

    mixed = [("a0", "a1", None)[i % 3] for i in range(args.batch)]
    mixed_hf = [name or "__base__" for name in mixed]
    gen = torch.Generator(device=plan.device).manual_seed(0)

    runs = {
        "hf": lambda: hf_generate(model, tokenizer, prompts, args.new_tokens),
        "engine": lambda: engine.generate(prompts, params, "a0", generator=gen),
        "engine-perrow": per_row,
        "engine-merged": merged,
    }
    if not args.no_mixed:
        runs["hf-mixed"] = lambda: hf_generate(model, tokenizer, prompts, args.new_tokens, mixed_hf)
        runs["engine-mixed"] = lambda: engine.generate(prompts, params, mixed, generator=gen)
    # Warm-up (first-call allocations, oneDNN kernel selection) at a short length.
    short = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=4, ignore_eos=True)
    hf_generate(model, tokenizer, prompts, 4)
    build_start = time.process_time()
    engine.generate(prompts, short, "a0")  # builds the merged copy of a0
    build_cpu_s = time.process_time() - build_start
    merged_copy = engine._merged_cache["a0"][1]
    copy_bytes = sum(
        t.numel() * t.element_size()
        for new, old in zip(merged_copy.layers, engine.base_weights.layers, strict=True)
        for g in new.proj
        for t in {id(x): x for x in (new.proj[g], (new.packed or {}).get(g)) if x is not None}.values()
        if t is not old.proj[g]
    )
    engine.merged_copies = 0
    engine.generate(prompts, short, "a0")
    engine.merged_copies = copies
    if not args.no_mixed:  # builds the engine's fused mixed-adapter weights (once per adapter set)
        engine.generate(prompts, short, mixed)
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, object] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():  # interleaved: each side sees the same load
            sync(plan.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = run()
            sync(plan.device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    tokens = args.batch * args.new_tokens
    figures: dict[str, object] = {"model": args.model, "batch": args.batch, "new_tokens": args.new_tokens,
                                  "lora_r": args.lora_r, "device": str(plan.device), "threads": args.threads}  # fmt: skip
    # On a shared CPU, wall time mostly measures the neighbours; with one thread, the process's
    # CPU time is the work done. Ratios are given for both (on a GPU, use wall time).
    for name, ts in times.items():
        t, c = statistics.median(ts), statistics.median(cpu[name])
        figures[name] = {"s": round(t, 3), "cpu_s": round(c, 3), "tokens_per_s": round(tokens / t, 1),
                         "tokens_per_cpu_s": round(tokens / c, 1)}  # fmt: skip
        base = "hf-mixed" if name.endswith("mixed") else "hf"
        figures[name]["vs_hf"] = round(statistics.median(times[base]) / t, 2)
        figures[name]["vs_hf_cpu"] = round(statistics.median(cpu[base]) / c, 2)
    # Log-prob drift vs a separate forward of the unmerged policy, on the last run's samples.
    model.set_adapter("a0")
    # The noise floor: HF generate's own log-probs (its logits at each step) vs the same forward.
    with torch.inference_mode():
        tokenizer.padding_side = "left"
        enc = tokenizer.pad({"input_ids": prompts[:4]}, return_tensors="pt").to(model.device)
        out = model.generate(
            **enc, max_new_tokens=args.new_tokens, do_sample=True, top_p=0.9, temperature=0.8, top_k=0,
            pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    diffs = []
    for row in range(4):
        new = out.sequences[row, enc["input_ids"].shape[1] :]
        eos = (new == tokenizer.eos_token_id).nonzero()
        n = int(eos[0]) if len(eos) else len(new)
        if n == 0:
            continue
        steps = torch.stack([out.logits[t][row] for t in range(n)]).float() / params.temperature
        own = steps.log_softmax(-1).gather(1, new[:n, None]).squeeze(1)
        prompt = [
            t
            for t, m in zip(enc["input_ids"][row].tolist(), enc["attention_mask"][row].tolist(), strict=True)
            if m
        ]
        diffs.append((own - hf_logprobs(model, prompt, new[:n].tolist(), params.temperature)).abs())
    d = torch.cat(diffs)
    figures["hf"]["logprob_drift_max"] = round(float(d.max()), 4)  # type: ignore[index]
    figures["hf"]["logprob_drift_mean"] = round(float(d.mean()), 5)  # type: ignore[index]
    for name in ("engine", "engine-perrow", "engine-merged"):
        diffs = []
        for seq in outputs[name][:4]:  # type: ignore[index]
            ref = hf_logprobs(model, seq.prompt_ids, seq.tokens, params.temperature)
            diffs.append((torch.tensor(seq.logprobs, device=ref.device) - ref).abs())
        d = torch.cat(diffs)
        figures[name]["logprob_drift_max"] = round(float(d.max()), 4)
        figures[name]["logprob_drift_mean"] = round(float(d.mean()), 5)
    figures["kv_cache_mib"] = round(engine.cache.nbytes() / 2**20, 1)
    figures["merged_copy_mib"] = round(copy_bytes / 2**20, 1)
    figures["merged_copy_build_cpu_s"] = round(build_cpu_s, 2)  # with a 4-token generate
    figures["peak_rss_mib"] = round(peak_rss_mib(), 0)
    if plan.device.type == "cuda":
        figures["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 0)
    print("load after:", uptime())
    for name in runs:
        f = figures[name]
        extra = (
            f" drift max {f['logprob_drift_max']} mean {f['logprob_drift_mean']}"
            if "logprob_drift_max" in f
            else ""
        )  # type: ignore[operator]
        print(
            f"{name:14s} {f['s']:8.2f} s {f['tokens_per_s']:7.1f} tok/s x{f['vs_hf']:.2f} | cpu {f['cpu_s']:7.2f} s "
            f"{f['tokens_per_cpu_s']:7.1f} tok/cpu-s x{f['vs_hf_cpu']:.2f} vs hf{extra}"
        )  # type: ignore[index]
    print(json.dumps(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        def per_row_profile():  # type: ignore[no-untyped-def]
            engine.merged_copies = 0
            try:
                return engine.generate(prompts, SamplingParams(0.8, 0.9, 17, ignore_eos=True), "a0")
            finally:
                engine.merged_copies = copies

        for name, run in (
            ("hf", lambda: hf_generate(model, tokenizer, prompts, 17)),
            ("engine", lambda: engine.generate(prompts, SamplingParams(0.8, 0.9, 17, ignore_eos=True), "a0")),
            ("engine-perrow", lambda: per_row_profile()),
        ):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            print(f"--- {name}: 16 decode steps (+ prefill) ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
