"""Decode throughput of the generation engine vs Hugging Face `generate`, in the same run.

    python bench/bench_generation.py [--model smollm2-135m-instruct] [--batch 16] [--new-tokens 128]
        [--lora-r 16] [--repeats 2] [--threads 1] [--device auto] [--profile]

The policy is the model + a random LoRA (r16, all projections) in bf16, as PPO samples it.
Rows, each `--batch` prompts x `--new-tokens` tokens (EOS ignored, so every row runs the full
length), timed alternately so both sides see the same machine load:

- hf: today's path, `PeftModel.generate` (top_p 0.9, temperature 0.8);
- engine: `alignment.generation.Engine`, per-row LoRA on the shared base weights;
- engine-merged: the same engine with the adapter merged into a bf16 copy (PPO rollouts);
- hf-mixed / engine-mixed: rows split over two adapters and the base model (the server's case;
  HF via PEFT's `adapter_names`).

Also reported: the log-prob drift of each engine variant against a separate HF forward pass of
the unmerged policy over the same sampled tokens (max and mean |difference|, nats), beside the
same drift of HF `generate`'s own step logits (the bf16 noise floor), and the engine's KV-cache
size. Times are wall and process CPU time (one thread: the work done, whatever the neighbours). `--profile` prints the torch profiler's top operators for one HF and
one engine decode of 16 tokens. `--ppo` times PPO steps instead (16 prompts, 64 new tokens, 2 PPO
epochs, `--repeats` steps): rollouts by the engine vs by HF generate (the pre-issue-13 sampler),
each on a trainer built with the same seed (one after the other), with the step's losses printed
beside the times. The samplers draw different random numbers, so the losses agree in
distribution, not token for token.
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


@torch.no_grad()
def hf_generate_rollouts(policy, tokenizer, prompt_ids, prompts, generation, engine=None):  # type: ignore[no-untyped-def]
    """The rollout sampler before issue 13 (alignment/rl/experience.py at a1e4a3f), verbatim but
    for the unused `engine` argument: the baseline of `--ppo`."""
    from transformers import GenerationConfig

    from alignment.rl.data import pad
    from alignment.rl.experience import Rollout

    device = next(policy.parameters()).device
    query_ids = pad(prompt_ids, tokenizer.pad_token_id, "left").to(device)
    query_mask = pad([[1] * len(p) for p in prompt_ids], 0, "left").to(device)
    config = GenerationConfig(
        do_sample=True, temperature=generation.temperature, top_p=generation.top_p, top_k=0,
        max_new_tokens=generation.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    output = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
    response_ids = output[:, query_ids.shape[1] :]
    is_eos = response_ids == tokenizer.eos_token_id
    ended_with_eos = is_eos.any(dim=1)
    T = response_ids.shape[1]
    first_eos = torch.where(
        ended_with_eos, is_eos.int().argmax(dim=1), torch.full_like(ended_with_eos, T - 1, dtype=torch.long)
    )
    response_mask = (torch.arange(T, device=device)[None, :] <= first_eos[:, None]).long()
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(
        list(prompts), responses, query_ids, query_mask, response_ids, response_mask, ended_with_eos
    )


def bench_ppo(args: argparse.Namespace) -> None:
    """One PPO step (16 prompts, 64 new tokens, 2 epochs, LoRA r16, bf16), rollouts by the engine
    vs by HF generate, each on its own trainer built with the same seed."""
    import tempfile

    import alignment.rl.ppo_trainer as ppo_trainer
    from alignment.config import load_config
    from alignment.rl.config import PPORunConfig

    def reward(prompts: list, responses: list[str]) -> list[float]:  # cheap and deterministic
        return [min(len(r), 200) / 100 for r in responses]

    print("load before:", uptime(), flush=True)
    import gc

    original = ppo_trainer.generate_rollouts
    stats: dict[str, list[dict[str, float]]] = {"engine": [], "hf": []}
    times: dict[str, list[float]] = {"engine": [], "hf": []}
    cpu: dict[str, list[float]] = {"engine": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        # One trainer at a time (two SmolLM2 PPO trainers at once did not fit beside the other
        # engineers' jobs): same seed, so both start from the same weights and prompts.
        for name in ("engine", "hf"):
            overrides = [
                f"model={args.model}", f"output_dir={tmp}/{name}", "tracking.report_to=none",
                "training.dtype=bf16", "lora.r=16", "lora.dropout=0.0", "ppo.rollout_batch_size=16",
                "ppo.mini_batch_size=8", "ppo.ppo_epochs=2", "ppo.generation.max_new_tokens=64",
            ]  # fmt: skip
            trainer, prompts, prompt_ids = ppo_trainer.build_ppo_trainer(
                load_config(PPORunConfig, None, overrides), reward
            )
            ppo_trainer.generate_rollouts = original if name == "engine" else hf_generate_rollouts
            for step in range(args.repeats):
                torch.manual_seed(100 + step)
                start, start_cpu = time.perf_counter(), time.process_time()
                stats[name].append(trainer.step(prompts[:16], prompt_ids[:16]))
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                print(name, step, f"{times[name][-1]:.1f} s", f"cpu {cpu[name][-1]:.1f} s", flush=True)
            del trainer
            gc.collect()
        ppo_trainer.generate_rollouts = original
    figures: dict[str, object] = {"peak_rss_mib": round(peak_rss_mib(), 0)}
    print("load after:", uptime())
    keys = ("loss/policy", "loss/value", "objective/kl", "reward/raw", "rollout/eos_fraction")
    for name in ("hf", "engine"):
        figures[name] = {
            "step_s": [round(t, 1) for t in times[name]], "step_cpu_s": [round(t, 1) for t in cpu[name]],
            **{k: [round(float(s.get(k, float("nan"))), 4) for s in stats[name]] for k in keys},
        }  # fmt: skip
        print(name, json.dumps(figures[name]))
    print(
        f"PPO step: engine x{statistics.median(times['hf']) / statistics.median(times['engine']):.2f} wall, "
        f"x{statistics.median(cpu['hf']) / statistics.median(cpu['engine']):.2f} CPU time vs HF generate rollouts"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


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
    parser.add_argument("--ppo", action="store_true", help="time one PPO step instead (see bench_ppo)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ppo:
        bench_ppo(args)
        return

    from alignment.generation import Engine, SamplingParams

    print("load before:", uptime(), flush=True)
    model, tokenizer, plan = build(args.model, args.device, args.lora_r)
    prompts = prompts_for(tokenizer, args.batch)
    params = SamplingParams(
        temperature=0.8, top_p=0.9, max_tokens=args.new_tokens, ignore_eos=True, logprobs=True
    )
    engine = Engine(model, tokenizer, max_batch_size=args.batch)
    merged = Engine(model, tokenizer, max_batch_size=args.batch, merge_adapter="a0")
    mixed = [("a0", "a1", None)[i % 3] for i in range(args.batch)]
    mixed_hf = [name or "__base__" for name in mixed]
    gen = torch.Generator(device=plan.device).manual_seed(0)

    runs = {
        "hf": lambda: hf_generate(model, tokenizer, prompts, args.new_tokens),
        "engine": lambda: engine.generate(prompts, params, "a0", generator=gen),
        "engine-merged": lambda: merged.generate(prompts, params, "a0", generator=gen),
    }
    if not args.no_mixed:
        runs["hf-mixed"] = lambda: hf_generate(model, tokenizer, prompts, args.new_tokens, mixed_hf)
        runs["engine-mixed"] = lambda: engine.generate(prompts, params, mixed, generator=gen)
    # Warm-up (first-call allocations, oneDNN kernel selection) at a short length.
    short = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=4, ignore_eos=True)
    hf_generate(model, tokenizer, prompts, 4)
    engine.generate(prompts, short, "a0")
    merged.generate(prompts, short, "a0")
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
    for name in ("engine", "engine-merged"):
        diffs = []
        for seq in outputs[name][:4]:  # type: ignore[index]
            ref = hf_logprobs(model, seq.prompt_ids, seq.tokens, params.temperature)
            diffs.append((torch.tensor(seq.logprobs, device=ref.device) - ref).abs())
        d = torch.cat(diffs)
        figures[name]["logprob_drift_max"] = round(float(d.max()), 4)
        figures[name]["logprob_drift_mean"] = round(float(d.mean()), 5)
    figures["kv_cache_mib"] = round(engine.cache.nbytes() / 2**20, 1)
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

        for name, run in (
            ("hf", lambda: hf_generate(model, tokenizer, prompts, 17)),
            ("engine", lambda: engine.generate(prompts, SamplingParams(0.8, 0.9, 17, ignore_eos=True), "a0")),
        ):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            print(f"--- {name}: 16 decode steps (+ prefill) ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
