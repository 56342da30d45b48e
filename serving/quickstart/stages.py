"""The quickstart's stages, each a thin call into the stage that owns the work.

Every stage writes into `<output_dir>/<name>` through a `.partial` directory renamed into place when
the stage finished, so an interrupted stage leaves nothing that looks complete; `valid` checks the
outputs themselves (files present and parseable), not a flag. The Argilla workspace and
`prefloop serve` are started inside `Context`'s exit stack, so they stop on success, failure and Ctrl-C.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from alignment.config import load_config
from serving.quickstart.config import CONFIGS, flatten
from serving.quickstart.context import (
    WORKSPACE,
    Context,
    Row,
    dump_history,
    has_adapter,
    read_json,
    read_jsonl,
    staged,
    write_json,
    write_jsonl,
)
from serving.quickstart.prompts import as_messages, load_split

# --- 1. model ----------------------------------------------------------------------------------


def run_model(ctx: Context) -> Row:
    from alignment.models import EMBEDDED, pull_model, resolve_model

    name = ctx.model_name()
    if name in EMBEDDED:
        path = pull_model(name)
    else:
        path = Path(resolve_model(name)) if Path(name).exists() else name
    return {"model": str(path)}


def valid_model(ctx: Context) -> bool:
    from alignment.models import EMBEDDED, model_dir, verify_checkpoint

    name = ctx.model_name()
    if name not in EMBEDDED:
        return True
    directory = model_dir(name)
    return directory.is_dir() and not verify_checkpoint(directory)


# --- 2. SFT ------------------------------------------------------------------------------------


def run_sft(ctx: Context) -> Row:
    from alignment.sft import SFTRunConfig, train_sft

    final = ctx.path("sft")
    with staged(final) as out:
        overrides = [*flatten(ctx.config.sft), f"model={ctx.model_name()}", f"output_dir={out}"]
        metrics = train_sft(load_config(SFTRunConfig, CONFIGS / "sft.yaml", overrides))
        dump_history(out)
    return {
        "adapter": str(final),
        "train_loss": metrics.get("train_loss"),
        "eval_loss": metrics.get("eval_loss"),
    }


def valid_sft(ctx: Context) -> bool:
    out = ctx.path("sft")
    return has_adapter(out) and (out / "metrics.json").is_file()


# --- 3. sample pairs from the SFT model -----------------------------------------------------------


def run_sample(ctx: Context) -> Row:
    from alignment.devices import plan_device
    from alignment.models import load_tokenizer, load_with_adapter
    from annotation.config import PushSettings
    from annotation.push import build_pairs
    from reward.evaluate import SamplingSettings, sample_responses

    s = ctx.config.sampling
    train, _ = load_split(ctx.config.prompts)
    prompts = [as_messages(p) for p in train]
    sft = ctx.path("sft")
    tokenizer = load_tokenizer(sft)
    model = load_with_adapter(ctx.model_name(), sft, plan_device()).eval()
    repeated = [p for p in prompts for _ in range(s.num_samples)]
    sampling = SamplingSettings(
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        batch_size=s.batch_size,
        seed=s.seed,
    )
    ctx.console.print(f"sampling {s.num_samples} responses for each of {len(prompts)} train prompts")
    _, ids = sample_responses(model, tokenizer, repeated, sampling)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
    responses = [texts[i * s.num_samples : (i + 1) * s.num_samples] for i in range(len(prompts))]
    push = PushSettings(num_samples=s.num_samples, max_pairs_per_prompt=s.max_pairs_per_prompt)
    pairs, dropped = build_pairs(prompts, responses, push, source="quickstart-sft")
    final = ctx.path("samples")
    with staged(final) as out:
        write_jsonl(
            out / "responses.jsonl",
            [{"prompt": p[-1]["content"], "responses": r} for p, r in zip(prompts, responses, strict=True)],
        )
        write_jsonl(
            out / "pairs.jsonl", [{"prompt": p.prompt, "first": p.first, "second": p.second} for p in pairs]
        )
    return {
        "prompts": len(prompts),
        "responses": len(texts),
        "pairs": len(pairs),
        "dropped_near_identical": dropped,
    }


def valid_sample(ctx: Context) -> bool:
    path = ctx.path("samples") / "pairs.jsonl"
    try:
        return len(read_jsonl(path)) > 0
    except (OSError, ValueError):
        return False


# --- 4. annotation in Argilla --------------------------------------------------------------------


def _dataset_settings(ctx: Context) -> Any:
    from annotation.config import DatasetSettings

    a = ctx.config.annotation
    guidelines = "Follow the rubric:\n" + "\n".join(f"- {line}" for line in ctx.rubric.describe())
    return DatasetSettings(
        name=a.dataset, workspace=WORKSPACE, min_submitted=a.votes_per_record, guidelines=guidelines
    )


def _annotator_credentials(ctx: Context, client: Any, names: list[str]) -> dict[str, dict[str, str]]:
    """Created once and kept (0600) beside the server's own owner file, so a re-run logs in again."""
    from annotation.users import add_user

    path = ctx.root / "argilla" / "annotators.json"
    creds = read_json(path) if path.is_file() else {}
    for name in names:
        if name not in creds:
            c = add_user(client, name, WORKSPACE)
            creds[name] = {"username": c.username, "password": c.password, "api_key": c.api_key}
            path.touch(mode=0o600)
            write_json(path, creds)
            path.chmod(0o600)
    return {n: creds[n] for n in names}


def run_annotate(ctx: Context) -> Row:
    from annotation.preference_dataset import CandidatePair
    from annotation.push import get_dataset, push_pairs
    from serving.quickstart.annotators import annotate_dataset, team

    _settings, connection = ctx.argilla()
    client = connection.client()
    dataset_settings = _dataset_settings(ctx)
    pairs = [
        CandidatePair(r["prompt"], r["first"], r["second"], "quickstart-sft")
        for r in read_jsonl(ctx.path("samples") / "pairs.jsonl")
    ]
    pushed = push_pairs(client, dataset_settings, pairs)
    a = ctx.config.annotation
    result: Row = {
        "url": connection.url,
        "records": pushed,
        "mode": a.mode,
        "dataset": f"{WORKSPACE}/{a.dataset}",
    }
    if a.mode == "human":
        creds = _annotator_credentials(ctx, client, ["annotator-1", "annotator-2", "annotator-3"])
        result["completed"] = wait_for_humans(
            ctx, get_dataset(client, dataset_settings), connection.url, creds, a.human_records
        )
        result["annotators"] = sorted(creds)
    else:
        members = team(a, ctx.rubric)
        creds = _annotator_credentials(ctx, client, [m.username for m in members])
        total = pushed * a.votes_per_record
        from rich.progress import Progress

        with Progress(console=ctx.console) as progress:
            task = progress.add_task("simulated annotators voting", total=total)
            run = annotate_dataset(
                connection.url,
                {n: c["api_key"] for n, c in creds.items()},
                members,
                a.dataset,
                WORKSPACE,
                a.votes_per_record,
                on_vote=lambda: progress.advance(task),
            )
        result.update(annotators=sorted(creds), submitted=run.submitted)
    ctx.path("annotate").mkdir(parents=True, exist_ok=True)
    write_json(ctx.path("annotate") / "result.json", result)
    return result


def wait_for_humans(
    ctx: Context, dataset: Any, url: str, creds: dict[str, dict[str, str]], needed: int
) -> int:
    from rich.live import Live

    ctx.console.print(f"\n[bold]Annotate in your browser:[/] {url}  (dataset {dataset.name})")
    for name, c in creds.items():
        ctx.console.print(f"  user [bold]{name}[/]  password [bold]{c['password']}[/]")
    ctx.console.print(
        f"Waiting until {needed} records have {ctx.config.annotation.votes_per_record} votes (Ctrl-C stops; re-run continues)."
    )
    with Live(console=ctx.console, refresh_per_second=1) as live:
        while True:
            progress = dataset.progress()
            live.update(f"completed {progress['completed']}/{needed} (of {progress['total']} records)")
            if progress["completed"] >= needed:
                return int(progress["completed"])
            time.sleep(3)


def valid_annotate(ctx: Context) -> bool:
    path = ctx.path("annotate") / "result.json"
    return path.is_file() and bool(read_json(path).get("records"))


# --- 5. pull: majority vote + agreement ----------------------------------------------------------


def run_preferences(ctx: Context) -> Row:
    from annotation.config import PullSettings
    from annotation.pull import pull

    _, connection = ctx.argilla()
    root = ctx.path("preferences")
    settings = PullSettings(min_votes=ctx.config.annotation.votes_per_record, output_dir=str(root))
    result = pull(connection.client(), _dataset_settings(ctx), settings)
    write_json(root / "latest.json", {"version_dir": str(result.directory)})
    return {
        "dataset": str(result.directory / "preferences.jsonl"),
        "pairs": result.rows,
        "skipped": result.skipped,
        "alpha": result.agreement.alpha,
        "position_bias_share_a": result.position_bias,
    }


def preferences_dir(ctx: Context) -> Path:
    return Path(read_json(ctx.path("preferences") / "latest.json")["version_dir"])


def valid_preferences(ctx: Context) -> bool:
    try:
        directory = preferences_dir(ctx)
        manifest = read_json(directory / "manifest.json")
        return manifest["pairs"] > 0 and len(read_jsonl(directory / "preferences.jsonl")) == manifest["pairs"]
    except (OSError, ValueError, KeyError):
        return False


# --- 6. reward model -----------------------------------------------------------------------------


def run_reward(ctx: Context) -> Row:
    from reward.trainer import RewardRunConfig, train_reward

    final = ctx.path("reward")
    data = preferences_dir(ctx) / "preferences.jsonl"
    with staged(final) as out:
        overrides = [
            *flatten(ctx.config.reward),
            f"model={ctx.model_name()}",
            f"output_dir={out}",
            f"data.train={data}",
        ]
        metrics = train_reward(load_config(RewardRunConfig, CONFIGS / "reward.yaml", overrides))
        dump_history(out)
    return {
        k: metrics.get(k) for k in ("train_loss", "heldout_accuracy", "heldout_mean_margin") if k in metrics
    }


def valid_reward(ctx: Context) -> bool:
    out = ctx.path("reward")
    return has_adapter(out) and (out / "reward_eval.json").is_file()


# --- 7. DPO from the SFT adapter -----------------------------------------------------------------


def run_dpo(ctx: Context) -> Row:
    from alignment.dpo import DPORunConfig, train_dpo

    final = ctx.path("dpo")
    data = preferences_dir(ctx) / "preferences.jsonl"
    with staged(final) as out:
        overrides = [
            *flatten(ctx.config.dpo),
            f"model={ctx.model_name()}",
            f"init_adapter={ctx.path('sft')}",
            f"output_dir={out}",
            f"data.train={data}",
        ]
        metrics = train_dpo(load_config(DPORunConfig, CONFIGS / "dpo.yaml", overrides))
        dump_history(out)
    return {
        k: v
        for k, v in metrics.items()
        if k in ("train_loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
    }


def valid_dpo(ctx: Context) -> bool:
    out = ctx.path("dpo")
    return has_adapter(out) and (out / "metrics.json").is_file()


# --- 7b. PPO / GRPO against the same reward model -------------------------------------------------


def _rl_prompts(ctx: Context, out: Path) -> Path:
    train, _ = load_split(ctx.config.prompts)
    path = out / "prompts.jsonl"
    write_jsonl(path, [{"prompt": p} for p in train])
    return path


def run_rl(ctx: Context) -> Row:
    """prefloop's PPO (or TRL's GRPO) from the SFT adapter, rewarded by the quickstart's reward model."""
    from reward.scorer import RewardScorer

    algorithm = ctx.config.algorithm
    final = ctx.path(algorithm)
    with staged(final) as out:
        prompts = _rl_prompts(ctx, out)
        overrides = [
            *flatten(ctx.config.rl),
            *flatten(ctx.config.ppo if algorithm == "ppo" else ctx.config.grpo),  # the quickstart's budget
            f"model={ctx.model_name()}",
            f"init_adapter={ctx.path('sft')}",
            f"reward_model={ctx.path('reward')}",
            f"output_dir={out}",
            f"data.prompts={prompts}",
        ]
        reward_fn = RewardScorer.from_pretrained(ctx.path("reward"))
        if algorithm == "ppo":
            from alignment.rl.config import PPORunConfig
            from alignment.rl.ppo import train_ppo

            metrics = train_ppo(load_config(PPORunConfig, CONFIGS / "ppo.yaml", overrides), reward_fn)
        else:
            from alignment.rl.config import GRPORunConfig
            from alignment.rl.grpo import train_grpo

            metrics = train_grpo(load_config(GRPORunConfig, CONFIGS / "grpo.yaml", overrides), reward_fn)
            dump_history(out)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def valid_rl(ctx: Context) -> bool:
    return has_adapter(ctx.path(ctx.config.algorithm))


def run_align(ctx: Context) -> Row:
    return run_dpo(ctx) if ctx.config.algorithm == "dpo" else run_rl(ctx)


def valid_align(ctx: Context) -> bool:
    return valid_dpo(ctx) if ctx.config.algorithm == "dpo" else valid_rl(ctx)
