"""Entry points the Argilla server's virtualenv runs: `python launcher.py server|worker`.

Run by file path with the server venv's python, never imported from prefloop: it puts its own
directory on `sys.path` so that the `sql_search` package registers itself with Argilla *before* the
Argilla app (or its job queues) are imported, which is what `argilla_server start` cannot do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="launcher.py")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("server", help="migrate + owner (from PREFLOOP_OWNER_* env), then uvicorn")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=6900)
    sub.add_parser("worker", help="rq worker for Argilla's background jobs")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sql_search  # noqa: F401  (registers the "sql" engine)

    if args.command == "server":
        import uvicorn

        prepare()
        uvicorn.run("argilla_server:app", host=args.host, port=args.port, access_log=False)
    else:
        from argilla_server.jobs.queues import DEFAULT_QUEUE, HIGH_QUEUE, REDIS_CONNECTION
        from rq import SimpleWorker

        # SimpleWorker runs jobs in-process (no fork per job): the jobs are short DB updates,
        # and the engine registered above stays registered for them.
        SimpleWorker([HIGH_QUEUE, DEFAULT_QUEUE], connection=REDIS_CONNECTION).work(with_scheduler=False)


def prepare() -> None:
    """Migrate, then create the owner unless it exists. Done inside the server process, so the slow
    argilla_server import happens once; the credentials come from the environment, never from a
    command line that `ps` shows."""
    import asyncio
    import contextlib
    import io
    import os

    from argilla_server.cli.database.migrate import migrate_db
    from argilla_server.cli.database.users.create import _create
    from argilla_server.database import async_engine
    from argilla_server.models import UserRole

    migrate_db("head")
    username = os.environ.pop("PREFLOOP_OWNER_USERNAME")
    password, api_key = os.environ.pop("PREFLOOP_OWNER_PASSWORD"), os.environ.pop("PREFLOOP_OWNER_API_KEY")

    # Argilla's helper echoes the new user's API key: keep it out of server.log
    async def create_owner() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            await _create(
                first_name=username,
                username=username,
                role=UserRole.owner,
                password=password,
                api_key=api_key,
            )
        # pooled asyncpg connections belong to this event loop; uvicorn runs another one
        await async_engine.dispose()

    asyncio.run(create_owner())


if __name__ == "__main__":
    main()
