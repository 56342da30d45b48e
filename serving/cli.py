"""The one `prefloop` command: each stage's CLI module registers its commands here.

serving is the top layer, so this is the one place allowed to import every stage.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import Annotated

import typer

app = typer.Typer(
    name="prefloop",
    help="Preference-alignment loop: annotate -> reward -> align -> serve -> feedback.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
train_app = typer.Typer(
    help="Training stages (each takes --config FILE.yaml and --set key=value).", no_args_is_help=True
)
app.add_typer(train_app, name="train")

# Each module has `register(app, train)`; commands import their heavy dependencies lazily.
STAGE_CLIS = ("alignment.cli", "reward.cli", "annotation.cli", "serving.commands")


def _version(value: bool) -> None:
    if value:
        print(f"prefloop {version('prefloop')}")
        raise typer.Exit()


@app.callback()
def main(
    _version_flag: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """prefloop: turn human judgement into better models."""


for module_name in STAGE_CLIS:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # a stage module that exists but fails to import is a bug: surface it
            raise
        continue
    module.register(app, train_app)
