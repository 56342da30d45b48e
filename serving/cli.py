"""The one `prefloop` command: mounts every stage's commands, imported explicitly.

serving is the top layer, so this is the one place allowed to import every stage. A stage
whose CLI module fails to import is an ImportError here, never a silently missing command.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Annotated

import typer

from alignment import cli as alignment_cli
from alignment.quiet import quiet_libraries
from annotation import cli as annotation_cli
from reward import cli as reward_cli
from reward import curation as curation_cli
from serving import commands as serving_commands
from serving.quickstart import cli as quickstart_cli
from serving.train_commands import train_app

app = typer.Typer(
    name="prefloop",
    help="Preference-alignment loop: annotate -> reward -> align -> serve -> feedback.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


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
    quiet_libraries()  # before any command imports peft, datasets or bitsandbytes


alignment_cli.register(app)  # models, chat
reward_cli.register(app)  # reward score, eval
curation_cli.register(app)  # data curate
annotation_cli.register(app)  # annotate ...
serving_commands.register(app)  # serve, feedback, loop, registry
quickstart_cli.register(app)  # quickstart: the whole loop end to end
app.add_typer(train_app, name="train")  # train sft|dpo|kto|reward|ppo|grpo
