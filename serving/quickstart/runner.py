"""Runs the quickstart's stages in order, skipping those whose outputs are present and valid.

`state.json` in the output directory records, per stage, a fingerprint of the configuration the
stage's outputs were made with, its wall time and its summary. A stage is skipped when its
outputs pass its `valid` check and were made with the same fingerprint (its own settings and every
upstream stage's); otherwise it runs again, and everything downstream of it does too. Ctrl-C (or
SIGTERM) stops the current stage; its `.partial` outputs are discarded on the next run, every server
is stopped on the way out, and the next run continues with that stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from serving.quickstart import evaluation, production
from serving.quickstart import stages as st
from serving.quickstart.config import QuickstartConfig
from serving.quickstart.context import Context, read_json, write_json
from serving.quickstart.report import write_report


def run_report(ctx: Context) -> dict[str, Any]:
    html, md = write_report(ctx)
    return {"html": str(html), "markdown": str(md)}


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[Context], dict[str, Any]]
    valid: Callable[[Context], bool]
    needs: tuple[str, ...] = ()


STAGES = (
    Stage("model", "pull the model", st.run_model, st.valid_model),
    Stage("sft", "SFT adapter", st.run_sft, st.valid_sft, ("model",)),
    Stage("sample", "sample + pair SFT responses", st.run_sample, st.valid_sample, ("sft",)),
    Stage("annotate", "Argilla annotation", st.run_annotate, st.valid_annotate, ("sample",)),
    Stage(
        "preferences",
        "pull votes (majority + agreement)",
        st.run_preferences,
        st.valid_preferences,
        ("annotate",),
    ),
    Stage("reward", "reward model", st.run_reward, st.valid_reward, ("preferences",)),
    # DPO needs the pairs; PPO/GRPO the reward model: either way both exist by then
    Stage(
        "align",
        "DPO / PPO / GRPO from the SFT adapter",
        st.run_align,
        st.valid_align,
        ("preferences", "reward", "sft"),
    ),
    Stage("eval", "held-out evaluation", evaluation.run_eval, evaluation.valid_eval, ("align", "reward")),
    Stage("serve", "serve + feedback + loop", production.run_serve, production.valid_serve, ("eval",)),
    # always rewritten: cheap, and it must show this run's stage times
    Stage("report", "report", run_report, lambda ctx: False, ("eval",)),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


class QuickstartError(RuntimeError):
    """A stage failed; the message names it and what to look at."""


def stage_settings(config: QuickstartConfig, name: str) -> Any:
    """The part of the configuration a stage's outputs depend on."""
    c = config.model_dump(mode="json")
    rubric = Path(config.rubric).read_text() if Path(config.rubric).is_file() else str(config.rubric)
    return {
        "model": [c["model"]],
        "sft": [c["model"], c["sft"]],
        "sample": [c["prompts"], c["sampling"]],
        "annotate": [c["annotation"], rubric],
        "preferences": [c["annotation"]["votes_per_record"]],
        "reward": [c["reward"]],
        # a DPO run's fingerprint is unchanged by the PPO/GRPO budgets (and stays what it was before them)
        "align": [
            c["algorithm"],
            c["dpo"],
            c["rl"],
            *([c[c["algorithm"]]] if c["algorithm"] != "dpo" else []),
        ],
        "eval": [c["eval"], c["prompts"], rubric],
        "serve": [c["serve"], rubric],
        "report": [],
    }[name]


def fingerprints(config: QuickstartConfig) -> dict[str, str]:
    out: dict[str, str] = {}
    by_name = {s.name: s for s in STAGES}
    for stage in STAGES:
        parts = [stage_settings(config, stage.name), [out[n] for n in stage.needs]]
        out[stage.name] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[
            :16
        ]
        assert all(n in by_name for n in stage.needs)
    return out


@contextlib.contextmanager
def sigterm_as_interrupt() -> Any:
    """SIGTERM unwinds like Ctrl-C, so the exit stack stops the servers either way."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_quickstart(
    config: QuickstartConfig,
    stages: list[str] | None = None,
    fresh: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run (or continue) the quickstart; returns the state: per-stage wall time, summary, skipped or ran."""
    console = console or Console(stderr=True)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    root = config.output_dir
    if fresh and root.exists():
        from annotation import workspace
        from annotation.config import ServerSettings

        workspace.down(ServerSettings(home=str(root / "argilla")))  # a server a killed run left behind
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / "state.json"
    state: dict[str, Any] = read_json(state_path) if state_path.is_file() else {"stages": {}}
    state["config"] = config.model_dump(mode="json")
    wanted = set(stages or STAGE_NAMES)
    unknown = wanted - set(STAGE_NAMES)
    if unknown:
        raise QuickstartError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGE_NAMES)}")
    prints = fingerprints(config)
    rerun: set[str] = set()
    total_start = time.monotonic()
    with contextlib.ExitStack() as stack, sigterm_as_interrupt():
        ctx = Context(config, console, stack)
        for stage in STAGES:
            record = state["stages"].get(stage.name, {})
            upstream_rerun = any(n in rerun for n in stage.needs)
            current = (
                record.get("fingerprint") == prints[stage.name]
                and not upstream_rerun
                and not record.get("stale")
            )
            if stage.name not in wanted:
                if any(stage.name in _needs(w) for w in wanted) and not (current and stage.valid(ctx)):
                    raise QuickstartError(
                        f"stage {stage.name!r} is needed by the stages asked for, but its outputs are "
                        f"missing, invalid or stale: run it too (--stages {stage.name},...)"
                    )
                continue
            if current and stage.valid(ctx):
                console.print(f"[dim]- {stage.name}: outputs present and valid, skipped[/]")
                record["skipped"] = True
                state["stages"][stage.name] = record
                continue
            console.rule(f"[bold]{stage.name}[/]: {stage.title}")
            started = time.monotonic()
            try:
                summary = stage.run(ctx)
            except KeyboardInterrupt:
                console.print(
                    f"[yellow]interrupted during {stage.name}; the next run continues from there[/]"
                )
                state["stages"].pop(stage.name, None)
                write_json(state_path, state)
                raise
            except Exception as exc:
                state["stages"].pop(stage.name, None)
                write_json(state_path, state)
                raise QuickstartError(f"stage {stage.name!r} failed: {type(exc).__name__}: {exc}") from exc
            wall = time.monotonic() - started
            state["stages"][stage.name] = {
                "fingerprint": prints[stage.name],
                "wall_s": round(wall, 1),
                "summary": summary,
                "skipped": False,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            rerun.add(stage.name)
            # Outputs built on the old ones are out of date even when their settings are not: a later
            # run must redo them, and this run must not present them as its result.
            for later in STAGES:
                downstream = stage.name in _needs(later.name) and later.name not in wanted
                if downstream and later.name in state["stages"]:
                    state["stages"][later.name]["stale"] = True
            write_json(state_path, state)
            console.print(f"[green]{stage.name} done in {wall:.1f} s[/]")
    state["this_run"] = {
        name: ("ran" if name in rerun else "skipped (valid)") for name in STAGE_NAMES if name in wanted
    }
    state["total_wall_s"] = round(time.monotonic() - total_start, 1)
    write_json(state_path, state)
    print_times(state, console)
    return state


def _needs(name: str) -> set[str]:
    """Every stage `name` depends on, directly or through others."""
    by_name = {s.name: s for s in STAGES}
    out: set[str] = set()
    todo = list(by_name[name].needs)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += by_name[n].needs
    return out


def print_times(state: dict[str, Any], console: Console) -> None:
    table = Table(title="quickstart stages")
    table.add_column("stage")
    table.add_column("wall time", justify="right")
    table.add_column("this run")
    this_run = state.get("this_run", {})
    for name in STAGE_NAMES:
        record = state["stages"].get(name)
        if record:
            if name in this_run:
                status = this_run[name]
            elif record.get("stale"):
                status = "[yellow]out of date: an earlier stage ran again[/]"
            else:
                status = "not asked for (earlier run)"
            table.add_row(name, f"{record.get('wall_s', 0):.1f} s", status)
    console.print(table)
    console.print(f"total this run: {state.get('total_wall_s', 0):.1f} s")
    stale = [name for name in STAGE_NAMES if state["stages"].get(name, {}).get("stale")]
    if stale:
        console.print(
            f"[yellow]{', '.join(stale)} predate this run's outputs; refresh them with "
            f"--stages {','.join(stale)}[/]"
        )
