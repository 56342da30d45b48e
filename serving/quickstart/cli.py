"""`prefloop quickstart`: the whole loop on the embedded model, with a report at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alignment.cli_common import ConfigOption, SetOption, cli_errors, console


def quickstart(
    config: ConfigOption = None,
    overrides: SetOption = None,
    small: Annotated[
        bool, typer.Option("--small", help="The small profile (a few minutes, for CI).")
    ] = False,
    profile: Annotated[str | None, typer.Option("--profile", help="A profile of the config file.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Base model: embedded name, local path or hub id.")
    ] = None,
    human: Annotated[
        bool,
        typer.Option("--human", help="Annotate in the Argilla UI yourself instead of the simulated team."),
    ] = False,
    algorithm: Annotated[str | None, typer.Option("--algorithm", help="dpo | ppo | grpo.")] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Where everything goes (default runs/quickstart).")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Delete the previous run's outputs and start over.")
    ] = False,
    stages: Annotated[
        str | None, typer.Option("--stages", help="Comma-separated subset, e.g. eval,report.")
    ] = None,
) -> None:
    """Pull -> SFT -> sample pairs -> Argilla annotation -> reward model -> DPO -> eval -> serve + feedback loop -> report."""
    from serving.quickstart.config import load_quickstart_config
    from serving.quickstart.runner import QuickstartError, run_quickstart

    if small and profile and profile != "small":
        raise typer.BadParameter("--small is --profile small", param_hint="--profile")
    flags = {
        "model": model,
        "algorithm": algorithm,
        "output_dir": output_dir,
        "annotation.mode": "human" if human else None,
    }
    sets = [*(overrides or []), *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    with cli_errors():
        try:
            cfg = load_quickstart_config(config, "small" if small else (profile or "default"), sets)
            state = run_quickstart(cfg, stages.split(",") if stages else None, fresh, console)
        except QuickstartError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[yellow]stopped; run the same command again to continue[/]")
            raise typer.Exit(130) from None
    record = state["stages"].get("report", {})
    report = record.get("summary", {})
    if report and not record.get("stale"):  # a stale report describes an earlier run's models
        from rich.markdown import Markdown

        console.print(Markdown(Path(report["markdown"]).read_text()))
        console.print(f"report: [bold]{report['html']}[/]")


def register(app: typer.Typer, train: typer.Typer | None = None) -> None:
    app.command("quickstart")(quickstart)
