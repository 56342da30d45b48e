"""Serving throughput and latency, and feedback write rate, against a real server on loopback.

    PREFLOOP_HOME=/tmp/pfhome python bench/bench_serving.py [--models tiny-random smollm2-135m-instruct]
        [--max-tokens 8 32 64] [--requests-per-client 2] [--threads 1] [--feedback 2000]

For each model (bf16 where the CPU has it) a server runs in its own process and 16 clients (the
official AsyncOpenAI client) each send requests back to back, each request with a `max_tokens`
drawn in turn from `--max-tokens` (mixed lengths: where static batching makes short answers wait
for long ones). Three servers, measured in the same run so the ratios hold whatever else runs:

- continuous: today's engine, requests join and leave the running batch between decode steps;
- static (before): the engine before issue 13 (`serving/generation.py` at LEGACY_REV, run from
  git): requests gathered for max_wait_ms, one `generate` call per batch;
- no batching: today's engine with max_batch_size=1 (the unbatched baseline).

Reported: completion tokens/s, p50/p99 latency, and throughput vs no batching; continuous also
with 1 client. Feedback: `--feedback` pairwise/thumbs/rating posts from 16 clients, each sent
twice (a client retry with the same idempotency key); reported writes/s over HTTP vs direct
store writes/s (the baseline), and lost/double-counted writes (must both be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

KEY, ADMIN = "bench-key", "bench-admin"
MESSAGES = [{"role": "user", "content": "Write a long story about the sea."}]
LEGACY_REV = "6617efb809168a77e2264d305e8f90943e1baf9d"  # last commit with static batching


def run_server(config: Path, legacy: Path | None) -> None:
    """The server process: `prefloop serve`'s app, or the same app over the pre-issue-13 engine."""
    import importlib.util

    import uvicorn
    import yaml

    from serving.api import build_app, create_app
    from serving.config import ServeConfig

    settings = ServeConfig(**yaml.safe_load(config.read_text()))
    if legacy is None:
        app = build_app(settings)
    else:
        import serving.generation as current
        from alignment.devices import plan_device
        from serving.feedback_store import FeedbackStore

        spec = importlib.util.spec_from_file_location("legacy_generation", legacy)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["legacy_generation"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        for name in ("Delta", "Generation", "Choice", "Job", "SamplingParams", "UnknownModelError"):
            setattr(module, name, getattr(current, name))  # the routes check these classes
        engine = module.GenerationEngine(
            settings.model, plan_device(settings.dtype), max_batch_size=settings.batching.max_batch_size,
            max_wait_ms=settings.batching.max_wait_ms, served_name=settings.served_name, threads=settings.threads,
        )  # fmt: skip
        app = create_app(settings, engine, FeedbackStore(settings.store_url))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


@contextmanager
def serve(tmp: Path, name: str, legacy: Path | None = None, **settings: object) -> Iterator[str]:
    """`prefloop serve` in its own process (so the clients here never share its GIL); yields the URL."""
    import socket

    import httpx
    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp / f"{name}-{port}.yaml"
    base = {
        "auth": {"api_keys": [KEY], "admin_key": ADMIN},
        "limits": {"requests_per_minute": 0},
        "port": port,
    }
    config.write_text(yaml.safe_dump(base | settings))
    cmd = [sys.executable, __file__, "--serve", str(config)] + (["--legacy", str(legacy)] if legacy else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            with suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(
    url: str, model: str, clients: int, per_client: int, max_tokens: list[int]
) -> dict[str, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=1200)
    latencies: list[float] = []
    tokens = 0
    failures = 0

    async def one_client(c: int) -> None:
        nonlocal tokens, failures
        for r in range(per_client):
            t0 = time.perf_counter()
            try:
                response = await client.chat.completions.create(
                    model=model,
                    messages=MESSAGES,
                    max_tokens=max_tokens[(c + r) % len(max_tokens)],
                    temperature=0.7,
                )
            except Exception:
                failures += 1
                continue
            latencies.append(time.perf_counter() - t0)
            tokens += response.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return {
        "tok_s": tokens / wall,
        "p50": percentile(latencies, 0.5) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"),
        "requests": len(latencies),
        "failures": failures,
    }


def bench_model(name: str, args: argparse.Namespace, table: Table, tmp: Path) -> None:
    from alignment.devices import plan_device

    legacy = tmp / "legacy_generation.py"
    legacy.write_text(subprocess.run(
        ["git", "show", f"{LEGACY_REV}:serving/generation.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout)  # fmt: skip
    results = {}
    modes = (("continuous", 16, None), ("static (before)", 16, legacy), ("no batching", 1, None))
    for label, batch, engine in modes:
        settings = {
            "model": name,
            "store_url": f"sqlite:///{tmp / f'{name}.db'}",
            "threads": args.threads,
            "batching": {"max_batch_size": batch, "max_wait_ms": 5},
        }
        with serve(tmp, name, engine, **settings) as url:
            asyncio.run(load(url, "prefloop-current", 2, 1, [4]))  # warm-up
            for clients in (1, 16) if label == "continuous" else (16,):
                console_load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
                results[(label, clients)] = asyncio.run(
                    load(url, "prefloop-current", clients, args.requests_per_client, args.max_tokens)
                ) | {"load": console_load.split("load average:")[-1].strip()}
    baseline = results[("no batching", 16)]["tok_s"]
    for (label, clients), r in results.items():
        table.add_row(
            f"{name} ({plan_device().name})", label, str(clients), f"{r['requests']}", f"{r['failures']}",
            f"{r['tok_s']:.1f}", f"{r['p50'] * 1000:.0f}", f"{r['p99'] * 1000:.0f}",
            f"{r['tok_s'] / baseline:.2f}x", str(r["load"]),
        )  # fmt: skip


def bench_feedback(args: argparse.Namespace, tmp: Path, console: Console) -> None:
    import httpx
    from sqlalchemy import func, select

    from serving import feedback_store as fs

    store_url = f"sqlite:///{tmp / 'feedback.db'}"
    store = fs.FeedbackStore(store_url)
    messages = [{"role": "user", "content": "hi"}]
    completions = [
        fs.Completion(
            id=f"bench-{i}", response_id="bench", choice_index=i, prompt_hash=fs.prompt_hash(messages), prompt=messages,
            response=f"answer {i}", model="m", model_version="m", params={}, finish_reason="stop", prompt_tokens=1,
            completion_tokens=2, latency_ms=1.0,
        )
        for i in range(10)
    ]  # fmt: skip
    with store.session() as s:
        fs.log_completions(s, completions)

    def body(i: int) -> dict:
        kind = i % 3
        if kind == 0:
            return {
                "type": "pairwise",
                "chosen_id": f"bench-{i % 10}",
                "rejected_id": f"bench-{(i + 1) % 10}",
            }
        if kind == 1:
            return {"type": "thumbs", "completion_id": f"bench-{i % 10}", "value": "up"}
        return {"type": "rating", "completion_id": f"bench-{i % 10}", "stars": 1 + i % 5}

    # Baseline: the same writes straight into the store from 16 threads (no HTTP, no validation layer).
    from concurrent.futures import ThreadPoolExecutor

    def direct(i: int) -> None:
        b = body(i)
        kind = b["type"]
        item = fs.FeedbackInput(
            kind, b.get("chosen_id") or b["completion_id"], rejected_id=b.get("rejected_id"),
            value={"thumbs": 1, "rating": b.get("stars"), "pairwise": None}[kind], idempotency_key=f"direct-{i}",
        )  # fmt: skip
        with store.session() as s:
            fs.add_feedback(s, item)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(direct, range(args.feedback)))
    direct_rate = args.feedback / (time.perf_counter() - t0)

    run = uuid.uuid4().hex[:8]

    async def post_all(url: str) -> list[int]:
        statuses: list[int] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.feedback):
            queue.put_nowait(i)
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        ) as http:

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    payload = body(i) | {"idempotency_key": f"{run}-{i}"}
                    for _ in range(2):  # the original and a client retry
                        statuses.append((await http.post("/v1/feedback", json=payload)).status_code)

            await asyncio.gather(*(worker() for _ in range(16)))
        return statuses

    with serve(tmp, "feedback", model="tiny-random", store_url=store_url, threads=1) as url:
        t0 = time.perf_counter()
        statuses = asyncio.run(post_all(url))
        wall = time.perf_counter() - t0
    with store.session() as s:
        stored = s.scalar(
            select(func.count()).select_from(fs.Feedback).where(fs.Feedback.idempotency_key.like(f"{run}-%"))
        )
    store.close()
    lost = args.feedback - stored
    table = Table(
        title=f"feedback writes ({args.feedback} posts x 2 with the same idempotency key, 16 clients)"
    )
    for col in ("path", "writes/s", "vs direct", "201", "200 (replay)", "other", "lost", "double-counted"):
        table.add_column(col, justify="right")
    http_rate = args.feedback / wall
    table.add_row("direct store (baseline)", f"{direct_rate:.0f}", "1.00x", "", "", "", "", "")
    table.add_row(
        "HTTP /v1/feedback", f"{http_rate:.0f}", f"{http_rate / direct_rate:.2f}x", str(statuses.count(201)),
        str(statuses.count(200)), str(len(statuses) - statuses.count(201) - statuses.count(200)),
        str(max(lost, 0)), str(max(-lost, 0)),
    )  # fmt: skip
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny-random", "smollm2-135m-instruct"])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="Generation threads (default: torch's).")
    parser.add_argument("--feedback", type=int, default=2000)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # internal: be the server
    parser.add_argument("--legacy", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run_server(args.serve, args.legacy)
        return
    console = Console(width=150)
    table = Table(
        title=f"chat completions (max_tokens cycling {args.max_tokens}, {args.requests_per_client} requests per client)"
    )
    for col in (
        "model",
        "server",
        "clients",
        "requests",
        "failed",
        "tokens/s",
        "p50 ms",
        "p99 ms",
        "vs no batching",
        "load (1/5/15 min)",
    ):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench_model(name, args, table, Path(tmp))
        console.print(table)
        if args.feedback:
            bench_feedback(args, Path(tmp), console)


if __name__ == "__main__":
    main()
