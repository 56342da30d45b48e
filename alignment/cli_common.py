"""The CLI pieces every stage shares: option types, the exit-2 error handler, run_stage, tables.

In the bottom layer so each stage's CLI module (alignment, reward, annotation, serving) can
import it; the commands themselves are mounted by `serving.cli`, the one `prefloop` app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from alignment.config import ConfigError
from alignment.data_files import DataError
from alignment.models import ModelError

console = Console(stderr=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set training.epochs=2 (repeatable)."),
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Resume from the latest checkpoint in output_dir.")
]
RayOption = Annotated[bool, typer.Option("--ray", help="Run on Ray Train (distributed.backend=ray).")]
WorkersOption = Annotated[
    int | None, typer.Option("--workers", help="Ray workers (distributed.num_workers).")
]

USER_ERRORS = (ConfigError, DataError, ModelError)
C = TypeVar("C")


@contextmanager
def cli_errors() -> Iterator[None]:
    """Bad input ends the command with its message and exit code 2, not a traceback."""
    try:
        yield
    except USER_ERRORS as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def option_overrides(options: dict[str, object | None], overrides: list[str] | None) -> list[str]:
    """Options that are sugar for `--set key=value` (those given), then the `--set`s, which win."""
    return [*(f"{key}={value}" for key, value in options.items() if value is not None), *(overrides or [])]


def run_overrides(
    overrides: list[str] | None, resume: bool = False, ray: bool = False, workers: int | None = None
) -> list[str]:
    """CLI flags are sugar for `--set` overrides, so a YAML file can say the same thing."""
    out = list(overrides or [])
    if resume:
        out.append("resume=true")
    if ray:
        out.append("distributed.backend=ray")
    if workers is not None:
        out.append(f"distributed.num_workers={workers}")
    return out


def run_stage(
    config_cls: type[C],
    train: Callable[[C], dict[str, Any]],
    config: Path | None,
    overrides: list[str] | None,
    resume: bool = False,
    ray: bool = False,
    workers: int | None = None,
) -> tuple[C, dict[str, Any]]:
    """Load the stage's config (file + flags) and train; bad input exits 2 with its message."""
    from alignment.config import load_config

    with cli_errors():
        cfg = load_config(config_cls, config, run_overrides(overrides, resume, ray, workers))
        return cfg, train(cfg)


def print_metrics(title: str, metrics: dict[str, object]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
