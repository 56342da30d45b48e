"""The quickstart's stages, each a thin call into the stage that owns the work.

Every stage writes into `<output_dir>/<name>` through a `.partial` directory renamed into place when
the stage finished, so an interrupted stage leaves nothing that looks complete; `valid` checks the
outputs themselves (files present and parseable), not a flag. The Argilla workspace and
`prefloop serve` are started inside `Context`'s exit stack, so they stop on success, failure and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from alignment.config import load_config
from serving.quickstart.config import CONFIGS, QuickstartConfig, flatten
from serving.quickstart.prompts import as_messages, load_split
from serving.quickstart.rubric import Rubric, load_rubric, score

Row = dict[str, Any]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
WORKSPACE = "prefloop"


@dataclass
class Context:
    config: QuickstartConfig
    console: Console
    stack: contextlib.ExitStack
    rubric: Rubric = field(init=False)
    _argilla: Any = None  # (ServerSettings, Connection) once started

    def __post_init__(self) -> None:
        self.rubric = load_rubric(self.config.rubric)

    @property
    def root(self) -> Path:
        return self.config.output_dir

    def path(self, stage: str) -> Path:
        return self.root / stage

    def model_name(self) -> str:
        return self.config.model

    # --- the Argilla workspace, started once per run and always stopped -------------------------
    def argilla(self) -> tuple[Any, Any]:
        if self._argilla is None:
            from annotation import workspace
            from annotation.config import ServerSettings

            # Our own server home and a free port: an existing `prefloop annotate up` workspace or a
            # second quickstart never collides with this one.
            settings = ServerSettings(
                home=str((self.root / "argilla").resolve()), port=workspace.free_port(), startup_timeout_s=300
            )
            workspace.down(settings)  # processes a killed earlier run left behind (recorded pids only)
            self.stack.callback(workspace.down, settings)
            connection = workspace.up(settings, self.console)
            self._argilla = (settings, connection)
        return self._argilla


def read_jsonl(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[Row]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def has_adapter(path: Path) -> bool:
    return all((path / f).is_file() and (path / f).stat().st_size > 0 for f in ADAPTER_FILES)


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A fresh `<final>.partial` directory, renamed to `final` only when the block completes."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def log_history(run_dir: Path) -> list[Row]:
    """The trainer's logged steps, from its last checkpoint's trainer_state.json."""
    states = sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1])
    )
    return read_json(states[-1])["log_history"] if states else []


def _dump_history(run_dir: Path) -> None:
    # the checkpoints keep the log as it stood then; the final one has every step
    write_json(run_dir / "log_history.json", log_history(run_dir))


# --- 1. model ----------------------------------------------------------------------------------


def run_model(ctx: Context) -> Row:
    from alignment.models import EMBEDDED, pull_model, resolve_model

    name = ctx.model_name()
    if name in EMBEDDED:
        path = pull_model(name)
    else:
        path = Path(resolve_model(name)) if Path(name).exists() else name
    return {"model": str(path)}


def valid_model(ctx: Context) -> bool:
    from alignment.models import EMBEDDED, model_dir, verify_checkpoint

    name = ctx.model_name()
    if name not in EMBEDDED:
        return True
    directory = model_dir(name)
    return directory.is_dir() and not verify_checkpoint(directory)


# --- 2. SFT ------------------------------------------------------------------------------------


def run_sft(ctx: Context) -> Row:
    from alignment.sft import SFTRunConfig, train_sft

    final = ctx.path("sft")
    with staged(final) as out:
        overrides = [*flatten(ctx.config.sft), f"model={ctx.model_name()}", f"output_dir={out}"]
        metrics = train_sft(load_config(SFTRunConfig, CONFIGS / "sft.yaml", overrides))
        _dump_history(out)
    return {
        "adapter": str(final),
        "train_loss": metrics.get("train_loss"),
        "eval_loss": metrics.get("eval_loss"),
    }


def valid_sft(ctx: Context) -> bool:
    out = ctx.path("sft")
    return has_adapter(out) and (out / "metrics.json").is_file()


# --- 3. sample pairs from the SFT model -----------------------------------------------------------


def run_sample(ctx: Context) -> Row:
    from alignment.devices import plan_device
    from alignment.models import load_tokenizer, load_with_adapter
    from annotation.config import PushSettings
    from annotation.push import build_pairs
    from reward.evaluate import SamplingSettings, sample_responses

    s = ctx.config.sampling
    train, _ = load_split(ctx.config.prompts)
    prompts = [as_messages(p) for p in train]
    sft = ctx.path("sft")
    tokenizer = load_tokenizer(sft)
    model = load_with_adapter(ctx.model_name(), sft, plan_device()).eval()
    repeated = [p for p in prompts for _ in range(s.num_samples)]
    sampling = SamplingSettings(
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        batch_size=s.batch_size,
        seed=s.seed,
    )
    ctx.console.print(f"sampling {s.num_samples} responses for each of {len(prompts)} train prompts")
    _, ids = sample_responses(model, tokenizer, repeated, sampling)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
    responses = [texts[i * s.num_samples : (i + 1) * s.num_samples] for i in range(len(prompts))]
    push = PushSettings(num_samples=s.num_samples, max_pairs_per_prompt=s.max_pairs_per_prompt)
    pairs, dropped = build_pairs(prompts, responses, push, source="quickstart-sft")
    final = ctx.path("samples")
    with staged(final) as out:
        write_jsonl(
            out / "responses.jsonl",
            [{"prompt": p[-1]["content"], "responses": r} for p, r in zip(prompts, responses, strict=True)],
        )
        write_jsonl(
            out / "pairs.jsonl", [{"prompt": p.prompt, "first": p.first, "second": p.second} for p in pairs]
        )
    return {
        "prompts": len(prompts),
        "responses": len(texts),
        "pairs": len(pairs),
        "dropped_near_identical": dropped,
    }


def valid_sample(ctx: Context) -> bool:
    path = ctx.path("samples") / "pairs.jsonl"
    try:
        return len(read_jsonl(path)) > 0
    except (OSError, ValueError):
        return False


# --- 4. annotation in Argilla --------------------------------------------------------------------


def _dataset_settings(ctx: Context) -> Any:
    from annotation.config import DatasetSettings

    a = ctx.config.annotation
    guidelines = "Follow the rubric:\n" + "\n".join(f"- {line}" for line in ctx.rubric.describe())
    return DatasetSettings(
        name=a.dataset, workspace=WORKSPACE, min_submitted=a.votes_per_record, guidelines=guidelines
    )


def _annotator_credentials(ctx: Context, client: Any, names: list[str]) -> dict[str, dict[str, str]]:
    """Created once and kept (0600) beside the server's own owner file, so a re-run logs in again."""
    from annotation.users import add_user

    path = ctx.root / "argilla" / "annotators.json"
    creds = read_json(path) if path.is_file() else {}
    for name in names:
        if name not in creds:
            c = add_user(client, name, WORKSPACE)
            creds[name] = {"username": c.username, "password": c.password, "api_key": c.api_key}
            path.touch(mode=0o600)
            write_json(path, creds)
            path.chmod(0o600)
    return {n: creds[n] for n in names}


def run_annotate(ctx: Context) -> Row:
    from annotation.preference_dataset import CandidatePair
    from annotation.push import get_dataset, push_pairs
    from serving.quickstart.annotators import annotate_dataset, team

    _settings, connection = ctx.argilla()
    client = connection.client()
    dataset_settings = _dataset_settings(ctx)
    pairs = [
        CandidatePair(r["prompt"], r["first"], r["second"], "quickstart-sft")
        for r in read_jsonl(ctx.path("samples") / "pairs.jsonl")
    ]
    pushed = push_pairs(client, dataset_settings, pairs)
    a = ctx.config.annotation
    result: Row = {
        "url": connection.url,
        "records": pushed,
        "mode": a.mode,
        "dataset": f"{WORKSPACE}/{a.dataset}",
    }
    if a.mode == "human":
        creds = _annotator_credentials(ctx, client, ["annotator-1", "annotator-2", "annotator-3"])
        result["completed"] = wait_for_humans(
            ctx, get_dataset(client, dataset_settings), connection.url, creds, a.human_records
        )
        result["annotators"] = sorted(creds)
    else:
        members = team(a, ctx.rubric)
        creds = _annotator_credentials(ctx, client, [m.username for m in members])
        total = pushed * a.votes_per_record
        from rich.progress import Progress

        with Progress(console=ctx.console) as progress:
            task = progress.add_task("simulated annotators voting", total=total)
            run = annotate_dataset(
                connection.url,
                {n: c["api_key"] for n, c in creds.items()},
                members,
                a.dataset,
                WORKSPACE,
                a.votes_per_record,
                on_vote=lambda: progress.advance(task),
            )
        result.update(annotators=sorted(creds), submitted=run.submitted)
    ctx.path("annotate").mkdir(parents=True, exist_ok=True)
    write_json(ctx.path("annotate") / "result.json", result)
    return result


def wait_for_humans(
    ctx: Context, dataset: Any, url: str, creds: dict[str, dict[str, str]], needed: int
) -> int:
    from rich.live import Live

    ctx.console.print(f"\n[bold]Annotate in your browser:[/] {url}  (dataset {dataset.name})")
    for name, c in creds.items():
        ctx.console.print(f"  user [bold]{name}[/]  password [bold]{c['password']}[/]")
    ctx.console.print(
        f"Waiting until {needed} records have {ctx.config.annotation.votes_per_record} votes (Ctrl-C stops; re-run continues)."
    )
    with Live(console=ctx.console, refresh_per_second=1) as live:
        while True:
            progress = dataset.progress()
            live.update(f"completed {progress['completed']}/{needed} (of {progress['total']} records)")
            if progress["completed"] >= needed:
                return int(progress["completed"])
            time.sleep(3)


def valid_annotate(ctx: Context) -> bool:
    path = ctx.path("annotate") / "result.json"
    return path.is_file() and bool(read_json(path).get("records"))


# --- 5. pull: majority vote + agreement ----------------------------------------------------------


def run_preferences(ctx: Context) -> Row:
    from annotation.config import PullSettings
    from annotation.pull import pull

    _, connection = ctx.argilla()
    root = ctx.path("preferences")
    settings = PullSettings(min_votes=ctx.config.annotation.votes_per_record, output_dir=str(root))
    result = pull(connection.client(), _dataset_settings(ctx), settings)
    write_json(root / "latest.json", {"version_dir": str(result.directory)})
    return {
        "dataset": str(result.directory / "preferences.jsonl"),
        "pairs": result.rows,
        "skipped": result.skipped,
        "alpha": result.agreement.alpha,
        "position_bias_share_a": result.position_bias,
    }


def preferences_dir(ctx: Context) -> Path:
    return Path(read_json(ctx.path("preferences") / "latest.json")["version_dir"])


def valid_preferences(ctx: Context) -> bool:
    try:
        directory = preferences_dir(ctx)
        manifest = read_json(directory / "manifest.json")
        return manifest["pairs"] > 0 and len(read_jsonl(directory / "preferences.jsonl")) == manifest["pairs"]
    except (OSError, ValueError, KeyError):
        return False


# --- 6. reward model -----------------------------------------------------------------------------


def run_reward(ctx: Context) -> Row:
    from reward.trainer import RewardRunConfig, train_reward

    final = ctx.path("reward")
    data = preferences_dir(ctx) / "preferences.jsonl"
    with staged(final) as out:
        overrides = [
            *flatten(ctx.config.reward),
            f"model={ctx.model_name()}",
            f"output_dir={out}",
            f"data.train={data}",
        ]
        metrics = train_reward(load_config(RewardRunConfig, CONFIGS / "reward.yaml", overrides))
        _dump_history(out)
    return {
        k: metrics.get(k) for k in ("train_loss", "heldout_accuracy", "heldout_mean_margin") if k in metrics
    }


def valid_reward(ctx: Context) -> bool:
    out = ctx.path("reward")
    return has_adapter(out) and (out / "reward_eval.json").is_file()


# --- 7. DPO from the SFT adapter -----------------------------------------------------------------


def run_dpo(ctx: Context) -> Row:
    from alignment.dpo import DPORunConfig, train_dpo

    final = ctx.path("dpo")
    data = preferences_dir(ctx) / "preferences.jsonl"
    with staged(final) as out:
        overrides = [
            *flatten(ctx.config.dpo),
            f"model={ctx.model_name()}",
            f"init_adapter={ctx.path('sft')}",
            f"output_dir={out}",
            f"data.train={data}",
        ]
        metrics = train_dpo(load_config(DPORunConfig, CONFIGS / "dpo.yaml", overrides))
        _dump_history(out)
    return {
        k: v
        for k, v in metrics.items()
        if k in ("train_loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
    }


def valid_dpo(ctx: Context) -> bool:
    out = ctx.path("dpo")
    return has_adapter(out) and (out / "metrics.json").is_file()


# --- 8. evaluation: aligned vs SFT on held-out prompts ------------------------------------------


class RecordingScorer:
    """The rubric as `compare_models`' scorer, keeping each call's texts so the reward model can score them too."""

    def __init__(self, rubric: Rubric) -> None:
        self.rubric = rubric
        self.calls: list[tuple[list[Any], list[str]]] = []

    def __call__(self, prompts: list[Any], responses: list[str]) -> list[float]:
        self.calls.append((list(prompts), list(responses)))
        return [
            score(self.rubric, p[-1]["content"], r).total for p, r in zip(prompts, responses, strict=True)
        ]


def run_eval(ctx: Context) -> Row:
    from reward.evaluate import ModelSpec, SamplingSettings, compare_models
    from reward.scorer import RewardScorer
    from serving.quickstart.stats import win_rate

    e = ctx.config.eval
    _, heldout = load_split(ctx.config.prompts)
    prompts = [as_messages(p) for p in heldout]
    aligned = ctx.path(ctx.config.algorithm)
    sft = ctx.path("sft")
    rubric_scorer = RecordingScorer(ctx.rubric)
    sampling = SamplingSettings(
        max_new_tokens=e.max_new_tokens, temperature=e.temperature, batch_size=e.batch_size, seed=e.seed
    )
    result = compare_models(
        ModelSpec(model=ctx.model_name(), adapter=aligned),
        ModelSpec(model=ctx.model_name(), adapter=sft),
        rubric_scorer,
        prompts,
        sampling,
        reference=ModelSpec(model=ctx.model_name(), adapter=sft),
    )
    (_, aligned_texts), (_, sft_texts) = rubric_scorer.calls
    reward_model = RewardScorer.from_pretrained(ctx.path("reward"))
    rm_aligned, rm_sft = reward_model(prompts, aligned_texts), reward_model(prompts, sft_texts)
    tol = ctx.rubric.tie_tolerance
    rubric_win = win_rate(
        result["candidate"]["rewards"], result["baseline"]["rewards"], tol, e.bootstrap, e.seed
    )
    rm_win = win_rate(rm_aligned, rm_sft, 1e-3, e.bootstrap, e.seed)

    def criteria(texts: list[str]) -> dict[str, float]:
        scores = [score(ctx.rubric, p, t) for p, t in zip(heldout, texts, strict=True)]
        names = scores[0].criteria
        out = {n: sum(s.criteria[n] for s in scores) / len(scores) for n in names}
        out["mean_words"] = sum(s.words for s in scores) / len(scores)
        return out

    report: Row = {
        "algorithm": ctx.config.algorithm,
        "prompts": len(prompts),
        "rubric_win_rate": rubric_win,
        "reward_model_win_rate": rm_win,
        "kl_to_sft": {
            "aligned": result["candidate"]["kl_to_reference"],
            "sft": result["baseline"]["kl_to_reference"],
        },
        "mean_length_tokens": {
            "aligned": result["candidate"]["mean_length"],
            "sft": result["baseline"]["mean_length"],
        },
        "ended_with_eos": {
            "aligned": result["candidate"]["ended_with_eos"],
            "sft": result["baseline"]["ended_with_eos"],
        },
        "rubric_mean": {
            "aligned": sum(result["candidate"]["rewards"]) / len(prompts),
            "sft": sum(result["baseline"]["rewards"]) / len(prompts),
        },
        "reward_mean": {"aligned": sum(rm_aligned) / len(prompts), "sft": sum(rm_sft) / len(prompts)},
        "criteria": {"aligned": criteria(aligned_texts), "sft": criteria(sft_texts)},
        "sampling": result["sampling"],
        "samples": [
            {"prompt": p, "sft": s, "aligned": a, "rubric_sft": r_s, "rubric_aligned": r_a}
            for p, s, a, r_s, r_a in zip(
                heldout,
                sft_texts,
                aligned_texts,
                result["baseline"]["rewards"],
                result["candidate"]["rewards"],
                strict=True,
            )
        ],
    }
    final = ctx.path("eval")
    with staged(final) as out:
        write_json(out / "eval.json", report)
    return {
        "rubric_win_rate": rubric_win["win_rate"],
        "rubric_ci95": rubric_win["ci95"],
        "reward_model_win_rate": rm_win["win_rate"],
        "reward_model_ci95": rm_win["ci95"],
        "kl_to_sft": report["kl_to_sft"]["aligned"],
    }


def valid_eval(ctx: Context) -> bool:
    path = ctx.path("eval") / "eval.json"
    try:
        data = read_json(path)
        return data["algorithm"] == ctx.config.algorithm and len(data["rubric_win_rate"]["ci95"]) == 2
    except (OSError, ValueError, KeyError):
        return False


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
        diff = score(rubric, prompt, text_a).total - score(rubric, prompt, text_b).total
        if abs(diff) > rubric.tie_tolerance:
            chosen, rejected = (id_a, id_b) if diff > 0 else (id_b, id_a)
            return [{"type": "pairwise", "chosen_id": chosen, "rejected_id": rejected}]
        choices = choices[:1]  # a tie says nothing pairwise: rate the first one instead
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


# --- 7b. PPO / GRPO against the same reward model -------------------------------------------------


def _rl_prompts(ctx: Context, out: Path) -> Path:
    train, _ = load_split(ctx.config.prompts)
    path = out / "prompts.jsonl"
    write_jsonl(path, [{"prompt": p} for p in train])
    return path


def run_rl(ctx: Context) -> Row:
    """prefloop's PPO (or TRL's GRPO) from the SFT adapter, rewarded by the quickstart's reward model."""
    from reward.scorer import RewardScorer

    algorithm = ctx.config.algorithm
    final = ctx.path(algorithm)
    with staged(final) as out:
        prompts = _rl_prompts(ctx, out)
        overrides = [
            *flatten(ctx.config.rl),
            f"model={ctx.model_name()}",
            f"init_adapter={ctx.path('sft')}",
            f"reward_model={ctx.path('reward')}",
            f"output_dir={out}",
            f"data.prompts={prompts}",
        ]
        reward_fn = RewardScorer.from_pretrained(ctx.path("reward"))
        if algorithm == "ppo":
            from alignment.rl.config import PPORunConfig
            from alignment.rl.ppo import train_ppo

            metrics = train_ppo(load_config(PPORunConfig, CONFIGS / "ppo.yaml", overrides), reward_fn)
        else:
            from alignment.rl.config import GRPORunConfig
            from alignment.rl.grpo import train_grpo

            metrics = train_grpo(load_config(GRPORunConfig, CONFIGS / "grpo.yaml", overrides), reward_fn)
            _dump_history(out)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def valid_rl(ctx: Context) -> bool:
    return has_adapter(ctx.path(ctx.config.algorithm))


def run_align(ctx: Context) -> Row:
    return run_dpo(ctx) if ctx.config.algorithm == "dpo" else run_rl(ctx)


def valid_align(ctx: Context) -> bool:
    return valid_dpo(ctx) if ctx.config.algorithm == "dpo" else valid_rl(ctx)
