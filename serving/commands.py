"""`prefloop serve`, `prefloop feedback ...`, `prefloop loop ...`, `prefloop registry ...`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from alignment.cli_common import ConfigOption, SetOption, cli_errors, console, print_metrics
from alignment.config import load_config


@contextmanager
def serving_errors() -> Iterator[None]:
    """cli_errors, plus the serving layer's own user errors: exit code 2 and the message."""
    import httpx

    from serving.feedback_store import FeedbackError
    from serving.registry import RegistryError

    with cli_errors():
        try:
            yield
        except (RegistryError, FeedbackError, httpx.HTTPError, ValueError) as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None


DEFAULT_SERVE_CONFIG = Path("configs/serve.yaml")
DEFAULT_LOOP_CONFIG = Path("configs/loop.yaml")

feedback_app = typer.Typer(
    help="Production feedback: store, stats, ingest into training data.", no_args_is_help=True
)
loop_app = typer.Typer(help="The retrain loop: trigger, DPO/KTO, eval, gate, promote.", no_args_is_help=True)
registry_app = typer.Typer(help="Model versions: list, promote, roll back.", no_args_is_help=True)

ServerOption = Annotated[
    str | None,
    typer.Option("--server-url", help="Running server to hot-swap (default: loop config's server_url)."),
]


def _config_path(path: Path | None, default: Path) -> Path | None:
    return path if path is not None else (default if default.is_file() else None)


def _serve_config(config: Path | None, overrides: list[str] | None):  # -> ServeConfig
    from serving.config import ServeConfig

    return load_config(ServeConfig, _config_path(config, DEFAULT_SERVE_CONFIG), overrides)


def _loop_config(config: Path | None, overrides: list[str] | None):  # -> LoopConfig
    from serving.config import LoopConfig

    return load_config(LoopConfig, _config_path(config, DEFAULT_LOOP_CONFIG), overrides)


def _store(url: str | None):
    from serving.feedback_store import FeedbackStore

    return FeedbackStore(url)


def serve(
    config: ConfigOption = None,
    overrides: SetOption = None,
    host: Annotated[str | None, typer.Option(help="Bind address (serve config: host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (serve config: port).")] = None,
) -> None:
    """Serve the base model and its adapters behind an OpenAI-compatible API."""
    import uvicorn

    from serving.api import build_app

    with serving_errors():
        settings = _serve_config(config, overrides)
        if host:
            settings.host = host
        if port is not None:
            settings.port = port
        if not settings.auth.client_keys() and not settings.auth.allow_anonymous:
            console.print("[yellow]no client API keys: set $PREFLOOP_API_KEYS or auth.api_keys[/]")
        app = build_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


@feedback_app.command("ingest")
def feedback_ingest(
    config: ConfigOption = None,
    overrides: SetOption = None,
    review: Annotated[
        bool, typer.Option("--review", help="Send the pairs to Argilla for human review.")
    ] = False,
) -> None:
    """Turn stored feedback into the next versioned, deduplicated preference dataset."""
    from serving.ingest import ingest

    with serving_errors():
        cfg = _loop_config(config, overrides)
        data = ingest(_store(cfg.serve.store_url), cfg.ingest.output_dir, cfg.ingest.min_rating_gap)
        if review or cfg.ingest.review:
            from serving.review import push_for_review

            dataset = push_for_review(data, cfg.ingest.annotation_config, cfg.ingest.review_dataset)
            console.print(
                f"pushed {data.pairs} pairs to Argilla dataset {dataset!r}; "
                "run `prefloop feedback pull-review` once reviewed"
            )
    label = f"{data.version} (unchanged)" if data.unchanged else data.version
    print_metrics(
        f"feedback -> {data.path}",
        {"version": label, "pairs": data.pairs, "new_pairs": data.new_pairs, "kto_rows": data.kto},
    )


@feedback_app.command("pull-review")
def feedback_pull_review(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Pull the reviewed pairs back from Argilla as the next dataset version."""
    from serving.ingest import latest_version
    from serving.review import pull_reviewed

    with serving_errors():
        cfg = _loop_config(config, overrides)
        latest = latest_version(cfg.ingest.output_dir)
        if latest is None:
            raise ValueError("no dataset version yet: run `prefloop feedback ingest --review` first")
        data = pull_reviewed(
            latest, cfg.ingest.output_dir, cfg.ingest.annotation_config, cfg.ingest.review_dataset
        )
    print_metrics(f"reviewed -> {data.path}", {"version": data.version, "pairs": data.pairs})


@feedback_app.command("stats")
def feedback_stats(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Counts of logged completions and feedback."""
    from serving.feedback_store import counts

    with serving_errors():
        store = _store(_serve_config(config, overrides).store_url)
        with store.session() as session:
            print_metrics(
                f"store {store.engine.url.render_as_string(hide_password=True)}", dict(counts(session))
            )


@feedback_app.command("migrate")
def feedback_migrate(
    config: ConfigOption = None,
    overrides: SetOption = None,
    revision: Annotated[str, typer.Option(help="Alembic revision to upgrade to.")] = "head",
) -> None:
    """Create or upgrade the store's schema (alembic)."""
    from serving.feedback_store import FeedbackStore

    with serving_errors():
        store = FeedbackStore(_serve_config(config, overrides).store_url, migrate=False)
        store.migrate(revision)
    console.print(f"store at {revision}")


@loop_app.command("run")
def loop_run(
    config: ConfigOption = None,
    overrides: SetOption = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep checking the trigger every poll_seconds.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain now, whatever the trigger says.")] = False,
) -> None:
    """Ingest feedback and, when the trigger fires, retrain, evaluate, gate and promote."""
    from serving.loop import LoopResult, run_forever, run_once

    def show(result: LoopResult) -> None:
        metrics = {"status": result.status, "data": result.data_version, "new_pairs": result.new_pairs}
        if result.version:
            metrics |= {
                "version": result.version,
                **{k: v for k, v in result.eval_result.items() if isinstance(v, int | float)},
            }
        if result.gate_failures:
            metrics["gate"] = "; ".join(result.gate_failures)
        print_metrics("loop", metrics)

    with serving_errors():
        cfg = _loop_config(config, overrides)
        store = _store(cfg.serve.store_url)
        admin = cfg.serve.auth.admin()
        if watch:
            run_forever(cfg, store, admin_key=admin, on_result=show)
        else:
            show(run_once(cfg, store, force=force, admin_key=admin))


@loop_app.command("status")
def loop_status(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Current model, data versions, and pairs waiting for the next retrain."""
    from serving.loop import status

    with serving_errors():
        cfg = _loop_config(config, overrides)
        info = status(cfg, _store(cfg.serve.store_url))
    versions = info.pop("versions")
    print_metrics("loop status", info)
    _print_versions(versions)


def _print_versions(versions: list[dict]) -> None:
    table = Table(title="model versions")
    for col in ("id", "parent", "status", "data", "win_rate", "created", "adapter"):
        table.add_column(col)
    for v in versions:
        win = (v.get("eval_result") or {}).get("win_rate")
        table.add_row(
            v["id"],
            v["parent_id"] or "base",
            v["status"],
            v["data_version"] or "",
            f"{win:.3f}" if isinstance(win, float) else "",
            str(v["created_at"])[:19],
            v["adapter_path"] or "",
        )
    Console().print(table)


@registry_app.command("list")
def registry_list(
    config: ConfigOption = None,
    overrides: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every version with its lineage and eval result."""
    from dataclasses import asdict

    from serving.registry import ModelRegistry

    with serving_errors():
        cfg = _loop_config(config, overrides)
        registry = ModelRegistry(_store(cfg.serve.store_url), cfg.serve.adapters_root)
        versions = [asdict(v) for v in registry.list()]
        current = registry.current()
    if as_json:
        print(
            json.dumps(
                {"current": current.id if current else None, "versions": versions}, default=str, indent=2
            )
        )
        return
    _print_versions(versions)
    console.print(f"current: {current.id if current else 'base'}")


def _swap(cfg, server_url: str | None) -> None:  # cfg: LoopConfig
    from serving.loop import notify_server

    url = server_url or cfg.server_url
    if url:
        swapped = notify_server(url, cfg.serve.auth.admin())
        console.print(f"server {url}: prefloop-current -> {swapped['current'] or 'base'}")


@registry_app.command("promote")
def registry_promote(
    version: Annotated[str, typer.Argument(help="Version id, e.g. v0003.")],
    config: ConfigOption = None,
    overrides: SetOption = None,
    server_url: ServerOption = None,
) -> None:
    """Make a version current (and hot-swap it into a running server)."""
    from serving.registry import ModelRegistry

    with serving_errors():
        cfg = _loop_config(config, overrides)
        ModelRegistry(_store(cfg.serve.store_url), cfg.serve.adapters_root).promote(version)
        _swap(cfg, server_url)
    console.print(f"current: {version}")


@registry_app.command("rollback")
def registry_rollback(
    to: Annotated[
        str | None, typer.Option("--to", help="Version to restore (default: the current one's parent).")
    ] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    server_url: ServerOption = None,
) -> None:
    """Serve an earlier version again (and hot-swap it into a running server)."""
    from serving.registry import ModelRegistry

    with serving_errors():
        cfg = _loop_config(config, overrides)
        now = ModelRegistry(_store(cfg.serve.store_url), cfg.serve.adapters_root).rollback(to)
        _swap(cfg, server_url)
    console.print(f"current: {now.id if now else 'base'}")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(feedback_app, name="feedback")
    app.add_typer(loop_app, name="loop")
    app.add_typer(registry_app, name="registry")
