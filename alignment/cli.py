"""`prefloop models pull|list` and `prefloop chat`. (Every `train` command is in serving/train_commands.py.)"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from alignment.cli_common import cli_errors

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
    from alignment.models import DEFAULT_MODEL, adapter_base_model
    from alignment.policy import load_policy, load_policy_tokenizer

    with cli_errors():
        base = model or (adapter_base_model(adapter) if adapter else DEFAULT_MODEL)
        tokenizer = load_policy_tokenizer(base, adapter)
        lm = load_policy(base, adapter)[0].eval()
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


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.command("chat")(chat)
