"""Stage 9: production traffic through `prefloop serve`: openai-client requests (some n=2), simulated
users rating them through /v1/feedback by the rubric, `feedback ingest`, one `loop run` turn through the
gate, and the promotion (hot-swap) or refusal the registry records.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from serving.quickstart.config import CONFIGS, flatten
from serving.quickstart.context import Context, Row, read_json, staged, write_json
from serving.quickstart.prompts import as_messages, load_split
from serving.quickstart.rubric import Rubric, score
from serving.quickstart.stages import preferences_dir

# --- 9. serving: production traffic, feedback, ingest, one loop turn ----------------------------


CLIENT_KEY_ENV = "PREFLOOP_API_KEYS"


def _free_port() -> int:
    from annotation.workspace import free_port

    return free_port()


def _start_server(ctx: Context, out: Path, store_url: str, client_key: str, admin_key: str) -> str:
    """`prefloop serve` as a child process in its own session, stopped through the exit stack."""
    import httpx

    port = _free_port()
    cmd = [
        sys.executable,
        "-c",
        "from serving.cli import app; app()",
        "serve",
        "--port",
        str(port),
        "--set",
        f"model={ctx.model_name()}",
        "--set",
        f"store_url={store_url}",
    ]
    if ctx.config.threads:
        cmd += ["--set", f"threads={ctx.config.threads}"]
    env = {**os.environ, CLIENT_KEY_ENV: client_key, "PREFLOOP_ADMIN_KEY": admin_key}
    log = (out / "serve.log").open("ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()

    ctx.stack.callback(stop)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    with ctx.console.status(f"waiting for prefloop serve at {url}"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prefloop serve exited with {proc.returncode}; see {out / 'serve.log'}")
            try:
                if (
                    httpx.get(
                        f"{url}/v1/models", headers={"Authorization": f"Bearer {client_key}"}, timeout=2
                    ).status_code
                    == 200
                ):
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"prefloop serve did not answer within 300 s; see {out / 'serve.log'}")


def corrected(rubric: Rubric, prompt: str, response: str) -> str:
    """What a user following the rubric would write instead: the house opener and closer, at most the band's words."""
    body = response.strip().removeprefix(rubric.opener).strip()
    body = body.removesuffix(rubric.closer).strip()
    kept = body.split()[: max(rubric.length.max_words - 4, rubric.length.min_words)]
    text = " ".join(kept).rstrip(",;:") or prompt.rstrip("?.!")
    return f"{rubric.opener} {text} {rubric.closer}"


def simulated_feedback(rubric: Rubric, prompt: str, choices: list[tuple[str, str]], turn: int) -> list[Row]:
    """Feedback bodies a rubric-following user posts for one request's choices (id, text)."""
    if len(choices) >= 2:
        (id_a, text_a), (id_b, text_b) = choices[:2]
        score_a, score_b = score(rubric, prompt, text_a), score(rubric, prompt, text_b)
        diff = score_a.total - score_b.total
        if abs(diff) <= rubric.tie_tolerance:
            # A pairwise UI makes the user pick; on a rubric tie they take the more concise reply.
            # A well-aligned policy ties often, so without this a run could post no pairwise pick.
            diff = score_b.words - score_a.words
        if diff:
            chosen, rejected = (id_a, id_b) if diff > 0 else (id_b, id_a)
            return [{"type": "pairwise", "chosen_id": chosen, "rejected_id": rejected}]
        choices = choices[:1]  # same score and length says nothing pairwise: rate the first one instead
    cid, text = choices[0]
    s = score(rubric, prompt, text)
    if turn % 2 == 0:
        body: Row = {"type": "thumbs", "completion_id": cid, "value": "up" if s.total >= 4 else "down"}
    else:
        body = {"type": "rating", "completion_id": cid, "stars": int(min(5, max(1, round(s.total))))}
    if s.total < 5 - rubric.tie_tolerance:  # any point lost: the user rewrites it the house way
        body["corrected_response"] = corrected(rubric, prompt, text)
        body["comment"] = "simulated user: rewritten to follow the house style"
    return [body]


def run_serve(ctx: Context) -> Row:
    import httpx
    from openai import OpenAI

    from serving.config import (
        EvalSettings,
        GateSettings,
        IngestSettings,
        LoopConfig,
        ServeConfig,
        TriggerSettings,
    )
    from serving.feedback_store import FeedbackStore, counts
    from serving.ingest import ingest
    from serving.loop import run_once
    from serving.registry import ModelRegistry

    s = ctx.config.serve
    final = ctx.path("serve")
    with staged(final) as out:
        store_url = f"sqlite:///{(out / 'feedback.db').resolve()}"
        store = FeedbackStore(store_url)
        registry = ModelRegistry(store)
        sft_version = registry.register(
            base_model=ctx.model_name(),
            adapter_path=str(ctx.path("sft").resolve()),
            parent_id=None,
            data_version=None,
            config={"stage": "sft"},
        )
        registry.promote(sft_version.id)
        aligned = registry.register(
            base_model=ctx.model_name(),
            adapter_path=str(ctx.path(ctx.config.algorithm).resolve()),
            parent_id=sft_version.id,
            data_version=None,  # registry data versions name feedback datasets; this one came from Argilla
            config={"stage": ctx.config.algorithm, "preferences": str(preferences_dir(ctx))},
        )
        registry.set_eval(
            aligned.id, read_json(ctx.path("eval") / "eval.json")["rubric_win_rate"], "candidate"
        )
        registry.promote(aligned.id)

        client_key, admin_key = "qs-" + secrets.token_urlsafe(12), "qs-admin-" + secrets.token_urlsafe(12)
        url = _start_server(ctx, out, store_url, client_key, admin_key)
        client = OpenAI(base_url=f"{url}/v1", api_key=client_key, max_retries=2, timeout=300)
        _, heldout = load_split(ctx.config.prompts)
        posted: dict[str, int] = {}
        fingerprints: set[str] = set()
        for turn in range(s.requests):
            prompt = heldout[turn % len(heldout)]
            n = 2 if turn % s.n2_every == 0 else 1
            response = client.chat.completions.create(
                model="prefloop-current",
                messages=as_messages(prompt),
                n=n,
                max_tokens=s.max_tokens,
                temperature=1.0,
                seed=s.seed + turn,
            )
            fingerprints.add(response.system_fingerprint or "")
            choices = [(c.model_extra["completion_id"], c.message.content or "") for c in response.choices]
            for i, body in enumerate(simulated_feedback(ctx.rubric, prompt, choices, turn)):
                body["idempotency_key"] = f"quickstart-{turn}-{i}"
                r = httpx.post(
                    f"{url}/v1/feedback",
                    json=body,
                    headers={"Authorization": f"Bearer {client_key}"},
                    timeout=60,
                )
                r.raise_for_status()
                posted[body["type"]] = posted.get(body["type"], 0) + 1
                if body.get("corrected_response"):
                    posted["corrected"] = posted.get("corrected", 0) + 1
        with store.session() as session:
            stored = counts(session)

        ingest_dir = out / "feedback-data"
        data = ingest(store, ingest_dir, 2)
        loop_train = dict(x.split("=", 1) for x in flatten(s.loop_train))
        loop_config = LoopConfig(
            serve=ServeConfig(model=ctx.model_name(), store_url=store_url),
            output_dir=out / "loop",
            algorithm="dpo",
            train_config=CONFIGS / "dpo.yaml",
            train_overrides={
                k: json.loads(v) if v[:1] in '0123456789-[{tfn"' else v for k, v in loop_train.items()
            },
            trigger=TriggerSettings(min_new_pairs=1),
            ingest=IngestSettings(output_dir=ingest_dir),
            eval=EvalSettings(reward_model=str(ctx.path("reward").resolve()), max_new_tokens=s.max_tokens),
            gate=GateSettings(),
            server_url=url,
        )
        turn_result = run_once(loop_config, store, force=True, admin_key=admin_key)
        after = client.chat.completions.create(
            model="prefloop-current", messages=as_messages(heldout[0]), max_tokens=16
        )
        versions = [
            {k: getattr(v, k) for k in ("id", "parent_id", "status", "adapter_path", "data_version")}
            | {"eval": v.eval_result}
            for v in registry.list()
        ]
        current = registry.current()
        result = {
            "server_url": url,
            "requests": s.requests,
            "feedback_posted": posted,
            "feedback_stored": stored,
            "data_version": data.version,
            "pairs": data.pairs,
            "kto_rows": data.kto,
            "loop": {
                "status": turn_result.status,
                "version": turn_result.version,
                "gate_failures": turn_result.gate_failures,
                "eval": turn_result.eval_result,
                "swapped": turn_result.swapped,
                "gate": loop_config.gate.model_dump(),
            },
            "served_before": sorted(fingerprints),
            "served_after": after.system_fingerprint,
            "current_version": current.id if current else None,
            "registry": versions,
        }
        write_json(out / "result.json", result)
    return {
        "feedback": posted,
        "loop": turn_result.status,
        "gate_failures": turn_result.gate_failures,
        "current": result["current_version"],
    }


def valid_serve(ctx: Context) -> bool:
    path = ctx.path("serve") / "result.json"
    try:
        return read_json(path)["loop"]["status"] in ("promoted", "rejected")
    except (OSError, ValueError, KeyError):
        return False
