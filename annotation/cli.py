"""`prefloop annotate up|down|status|users add|push|pull|progress`.

Every client command talks to the Argilla that `server:` in the config (or ARGILLA_API_URL /
ARGILLA_API_KEY) points at: the local one that `up` started, or a remote one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from alignment.cli_common import ConfigOption, SetOption, cli_errors, console
from annotation.config import AnnotationConfig

annotate_app = typer.Typer(
    help="Annotation workspace (Argilla): server, annotators, push pairs, pull preferences.",
    no_args_is_help=True,
)
users_app = typer.Typer(help="Annotator accounts.", no_args_is_help=True)
annotate_app.add_typer(users_app, name="users")
out = Console()


def _config(config: Path | None, overrides: list[str] | None) -> AnnotationConfig:
    from alignment.config import load_config

    return load_config(AnnotationConfig, config, overrides)


@contextmanager
def _errors() -> Iterator[None]:
    """Configuration/data errors via the shared handler; server and API errors get the same treatment."""
    from argilla._exceptions import ArgillaError

    from annotation.server_venv import ServerVenvError
    from annotation.workspace import WorkspaceError

    with cli_errors():
        try:
            yield
        except (WorkspaceError, ServerVenvError, ArgillaError) as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None


@annotate_app.command("up")
def up_command(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Start the local Argilla server (+ Redis + worker) and wait until it is ready."""
    from annotation import workspace

    with _errors():
        cfg = _config(config, overrides)
        connection = workspace.up(cfg.server, console)
    out.print(connection.url)


@annotate_app.command("down")
def down_command(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Stop the processes `up` started."""
    from annotation import workspace

    with _errors():
        stopped = workspace.down(_config(config, overrides).server)
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@annotate_app.command("status")
def status_command(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Local processes and whether the API answers."""
    from annotation import workspace

    with _errors():
        state = workspace.status(_config(config, overrides).server)
    processes = (
        ", ".join(f"{n}={'up' if ok else 'DOWN'}" for n, ok in state["processes"].items()) or "none started"
    )
    out.print(f"{state['url']}  ready={state['ready']}  processes: {processes}  home: {state['home']}")
    if not state["ready"]:
        raise typer.Exit(1)


@users_app.command("add")
def users_add_command(
    username: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[str, typer.Option("--role", help="annotator | admin | owner.")] = "annotator",
    password: Annotated[str | None, typer.Option("--password", help="Generated when omitted.")] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Create a user in the project's workspace and print their credentials (once)."""
    from annotation.users import add_user
    from annotation.workspace import resolve_connection

    if role not in ("annotator", "admin", "owner"):
        raise typer.BadParameter("role must be annotator, admin or owner", param_hint="--role")
    with _errors():
        cfg = _config(config, overrides)
        client = resolve_connection(cfg.server).client()
        creds = add_user(client, username, cfg.dataset.workspace, role, password)  # type: ignore[arg-type]
    out.print(
        f"username: {creds.username}\npassword: {creds.password}\napi key:  {creds.api_key}\nrole:     {creds.role}"
    )
    out.print("[dim]Shown once: hand these to the annotator now.[/]")


@annotate_app.command("push")
def push_command(
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="JSONL of prompts to sample pairs for.")
    ] = None,
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help="Existing pairs (preference JSONL, e.g. feedback).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="push.model")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="push.adapter")] = None,
    reward_model: Annotated[str | None, typer.Option("--reward-model", help="push.reward_model")] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Sample (or read) candidate pairs, score them, and push them uncertainty-first."""
    from alignment.prompts import load_prompts
    from annotation import push
    from annotation.workspace import resolve_connection

    if (prompts is None) == (pairs is None):
        raise typer.BadParameter("give exactly one of --prompts or --pairs")
    flags = {"push.model": model, "push.adapter": adapter, "push.reward_model": reward_model}
    overrides = [*(overrides or []), *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    with _errors():
        cfg = _config(config, overrides)
        client = resolve_connection(cfg.server).client()  # fail fast, before loading models
        scorer = None
        if cfg.push.reward_model:
            from reward.scorer import RewardScorer

            scorer = RewardScorer.from_pretrained(cfg.push.reward_model)
        dropped = 0
        if prompts is not None:
            candidates, dropped = push.generated_pairs(load_prompts(prompts), cfg.push, scorer)
        else:
            candidates = push.load_pairs(pairs)  # type: ignore[arg-type]
            if scorer is not None:
                candidates = push.score_pairs(candidates, scorer)
        count = push.push_pairs(client, cfg.dataset, candidates)
    out.print(
        f"pushed {count} records to {cfg.dataset.workspace}/{cfg.dataset.name} "
        f"({dropped} near-identical pairs dropped)"
    )


@annotate_app.command("pull")
def pull_command(
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="pull.output_dir")] = None,
    min_votes: Annotated[int | None, typer.Option("--min-votes", help="pull.min_votes")] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Aggregate submitted votes into a versioned preference dataset and report agreement."""
    from annotation.pull import pull
    from annotation.workspace import resolve_connection

    flags = {"pull.output_dir": output_dir, "pull.min_votes": min_votes}
    overrides = [*(overrides or []), *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    with _errors():
        cfg = _config(config, overrides)
        result = pull(resolve_connection(cfg.server).client(), cfg.dataset, cfg.pull)
    verb = "unchanged:" if result.unchanged else "wrote"  # the same votes give the same version
    out.print(
        f"{verb} {result.rows} pairs in {result.directory / 'preferences.jsonl'}; skipped {result.skipped}"
    )
    alpha = result.agreement.alpha
    out.print(f"Krippendorff's alpha: {alpha:.3f}" if alpha is not None else "Krippendorff's alpha: n/a")
    if result.position_bias is not None:
        out.print(f"share of votes for A: {result.position_bias:.2f}")
    table = Table(title="Agreement")
    table.add_column("annotator(s)")
    table.add_column("value", justify="right")
    for (a, b), kappa in result.agreement.pairwise_kappa.items():
        table.add_row(f"{a} vs {b} (Cohen's kappa)", f"{kappa:.3f}")
    for annotator, share in result.agreement.with_consensus.items():
        flag = "  [red]below threshold[/]" if annotator in result.agreement.flagged else ""
        table.add_row(f"{annotator} vs consensus", f"{share:.2f}{flag}")
    out.print(table)


@annotate_app.command("progress")
def progress_command(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Dataset completion and each annotator's submitted/draft/discarded counts."""
    from annotation.push import get_dataset
    from annotation.workspace import resolve_connection

    with _errors():
        cfg = _config(config, overrides)
        progress = get_dataset(resolve_connection(cfg.server).client(), cfg.dataset).progress(
            with_users_distribution=True
        )
    out.print(
        f"{cfg.dataset.workspace}/{cfg.dataset.name}: {progress['completed']}/{progress['total']} completed, "
        f"{progress['pending']} pending"
    )
    table = Table("annotator", "submitted", "draft", "discarded")
    for user, dist in sorted(progress.get("users", {}).items()):
        totals = {k: dist["completed"][k] + dist["pending"][k] for k in ("submitted", "draft", "discarded")}
        table.add_row(user, *(str(totals[k]) for k in ("submitted", "draft", "discarded")))
    out.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(annotate_app, name="annotate")
