"""`prefloop models ...`, `prefloop chat`, `prefloop train sft`, and the CLI pieces every stage shares."""

from __future__ import annotations

import sys
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


models_app = typer.Typer(help="Embedded models: pull and list.", no_args_is_help=True)


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="Embedded model name (see `prefloop models list`).")],
    force: Annotated[bool, typer.Option(help="Rebuild even when a verified copy exists.")] = False,
) -> None:
    """Download, dequantize and cache an embedded model as safetensors."""
    from alignment.models import pull_model

    with cli_errors():
        print(pull_model(name, force=force))


@models_app.command("list")
def models_list() -> None:
    """Embedded models and whether they are pulled."""
    from alignment.models import list_models

    table = Table("name", "pulled", "path", "description")
    for row in list_models():
        table.add_row(row["name"], row["pulled"], row["path"], row["description"])
    Console().print(table)


def chat(
    prompt: Annotated[str | None, typer.Argument(help="One prompt; omit for an interactive session.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: the adapter's base).")] = None,
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter directory.")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
) -> None:
    """Chat with a model (+ adapter), streaming tokens."""
    from alignment.chat import stream_reply
    from alignment.models import DEFAULT_MODEL, adapter_base_model, load_tokenizer, load_with_adapter

    with cli_errors():
        base = model or (adapter_base_model(adapter) if adapter else DEFAULT_MODEL)
        tokenizer = load_tokenizer(adapter or base)
        lm = load_with_adapter(base, adapter).eval()
    history = [{"role": "system", "content": system}] if system else []
    prompts = [prompt] if prompt is not None else None
    while True:
        if prompts is not None:
            if not prompts:
                return
            text = prompts.pop()
        else:
            try:
                text = input("you> ")
            except EOFError:
                return
            if text.strip() in {"", "/exit", "/quit"}:
                return
        history.append({"role": "user", "content": text})
        reply = []
        for piece in stream_reply(lm, tokenizer, history, max_new_tokens, temperature):
            sys.stdout.write(piece)
            sys.stdout.flush()
            reply.append(piece)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def train_sft_command(
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: ResumeOption = False,
    ray: RayOption = False,
    workers: WorkersOption = None,
) -> None:
    """Supervised fine-tuning of a LoRA/QLoRA adapter (TRL SFTTrainer)."""
    from alignment.sft import SFTRunConfig, train_sft

    cfg, metrics = run_stage(SFTRunConfig, train_sft, config, overrides, resume, ray, workers)
    print_metrics(f"SFT -> {cfg.output_dir}", metrics)


def train_dpo_command(
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: ResumeOption = False,
    ray: RayOption = False,
    workers: WorkersOption = None,
) -> None:
    """Direct Preference Optimization from an SFT adapter on chosen/rejected pairs (TRL DPOTrainer)."""
    from alignment.dpo import DPORunConfig, train_dpo

    cfg, metrics = run_stage(DPORunConfig, train_dpo, config, overrides, resume, ray, workers)
    print_metrics(f"DPO -> {cfg.output_dir}", metrics)


def train_kto_command(
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: ResumeOption = False,
    ray: RayOption = False,
    workers: WorkersOption = None,
) -> None:
    """KTO on unpaired thumbs-up/thumbs-down feedback (TRL KTOTrainer)."""
    from alignment.kto import KTORunConfig, train_kto

    cfg, metrics = run_stage(KTORunConfig, train_kto, config, overrides, resume, ray, workers)
    print_metrics(f"KTO -> {cfg.output_dir}", metrics)


def register(app: typer.Typer, train: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.command("chat")(chat)
    train.command("sft")(train_sft_command)
    train.command("dpo")(train_dpo_command)
    train.command("kto")(train_kto_command)
