"""The server's engine: one base model, several LoRA adapters, continuous batching, streaming.

A background thread owns `alignment.generation.Engine` (the one engine everything that samples
uses). Requests join the running batch between two decode steps and leave it as soon as they
finish, so no request waits for another's long answer; each row keeps its own adapter,
temperature, top_p, `max_tokens` and stop sequences. After every step the new text of each row
is pushed to the waiting request's asyncio queue, which is what both streaming and plain
responses read; text that could still grow into a stop sequence is held back.

Adapters are hot-swapped without failing a request: the new adapter is loaded under the model
lock (between two decode steps), the alias (`prefloop-current`) is repointed, and the old adapter
is unloaded only once no admitted request still refers to it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignment.devices import DevicePlan, plan_device
from alignment.generation import Engine, Sequence
from alignment.generation import SamplingParams as RowParams
from alignment.models import load_causal_lm, load_tokenizer

log = logging.getLogger("prefloop.serving")

CURRENT_ALIAS = "prefloop-current"
BASE_ADAPTER = "__base__"  # "no adapter": the base model
_SWEEP = "sweep"  # queue message: unload retired adapters that no request uses any more


class UnknownModelError(LookupError):
    """The request names a model that is neither the base, an alias nor a loaded adapter."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None  # best effort, as in OpenAI's API: same seed, model and request, same choices

    def choice_seed(self, index: int) -> int | None:
        """Choice 0 samples from `seed` itself (so n=1 and the first of n=2 agree), the others from
        seeds spread by the golden-ratio constant."""
        if self.seed is None:
            return None
        return (self.seed + index * 0x9E3779B97F4A7C15) % 2**64


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass(frozen=True)
class Delta:
    """One streamed event: new text for a choice, and its finish reason once it is done."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0  # set on the finishing event


@dataclass
class Generation:
    """A finished request: what the app returns to the client and logs to the store."""

    model_version: str
    prompt_tokens: int
    choices: list[Choice]
    latency_s: float


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str
    version: str  # what the client is told answered: the adapter name, or the base model's name
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Delta | BaseException]
    cancelled: bool = False


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop sequence."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


@dataclass
class _Row:
    """One choice of a request, answered by one engine sequence; `emitted` chars already sent."""

    job: Job
    index: int
    seq: Sequence
    emitted: int = 0

    def emit(self) -> bool:
        """Send the text that can no longer change; True once the row is finished."""
        seq, job = self.seq, self.job
        if seq.done:
            delta = Delta(self.index, seq.text[self.emitted :], seq.finish_reason, len(seq.tokens))
            job.loop.call_soon_threadsafe(job.events.put_nowait, delta)
            return True
        safe = len(seq.text) - _holdback(seq.text, job.params.stop)
        if safe > self.emitted:
            delta = Delta(self.index, seq.text[self.emitted : safe])
            job.loop.call_soon_threadsafe(job.events.put_nowait, delta)
            self.emitted = safe
        return False


class GenerationEngine:
    """Holds the model and its adapters; `generate` / `stream` are safe to call from any event loop."""

    def __init__(
        self,
        model: str,
        plan: DevicePlan | None = None,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        served_name: str | None = None,
        threads: int | None = None,
        merged_copies: int = 2,
    ):
        self.threads = threads
        self.plan = plan or plan_device()
        self.base_name = served_name or Path(model).name
        self.tokenizer = load_tokenizer(model)
        self.model: Any = load_causal_lm(model, self.plan).eval()
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.engine = Engine(
            self.model, self.tokenizer, max_batch_size=max_batch_size, merged_copies=merged_copies
        )
        self.eos_ids = self.engine.eos_ids
        self.adapters: dict[str, Path] = {}  # loaded adapter name -> path
        self.aliases: dict[str, str] = {CURRENT_ALIAS: BASE_ADAPTER}
        self._in_use: Counter[str] = Counter()  # admitted requests per adapter
        self._retired: set[str] = set()  # adapters to unload once no request uses them
        self._pinned: set[str] = set()  # loaded explicitly: never retired by a swap
        self._names = threading.Lock()  # guards adapters/aliases/_in_use/_retired
        self._model_lock = threading.Lock()  # held while stepping or changing adapters
        self._queue: queue.Queue[Job | str | None] = queue.Queue()  # None = stop
        self._rows: dict[int, _Row] = {}  # engine sequence id -> the request row it answers
        self.steps = 0
        self._worker = threading.Thread(target=self._run, name="prefloop-generate", daemon=True)
        self._worker.start()

    # --- adapters -------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        with self._names:
            return [self.base_name, *self.aliases, *self.adapters]

    def resolve(self, name: str) -> str:
        """Served model name -> loaded adapter name (or BASE_ADAPTER)."""
        with self._names:
            return self._resolve(name)

    def _resolve(self, name: str) -> str:
        if name in (self.base_name, "base"):
            return BASE_ADAPTER
        if name in self.aliases:
            return self.aliases[name]
        if name in self.adapters and name not in self._retired:
            return name
        raise UnknownModelError(name)

    def version_of(self, adapter: str) -> str:
        return self.base_name if adapter == BASE_ADAPTER else adapter

    def _load(self, name: str, path: Path) -> None:
        """Load an adapter (caller holds the model lock)."""
        self.engine.load_adapter(name, path)

    def load_adapter(self, name: str, path: str | Path, pin: bool = True) -> None:
        """Load an adapter under `name`. Pinned adapters (from the config or the admin API) stay
        loaded; unpinned ones (loaded by `swap`) are unloaded once no alias points at them."""
        if name in (BASE_ADAPTER, CURRENT_ALIAS, self.base_name, "base"):
            raise ValueError(f"adapter name {name!r} is reserved")
        with self._model_lock:
            with self._names:
                loaded = name in self.adapters
                self._retired.discard(name)
                if pin:
                    self._pinned.add(name)
            if not loaded:
                self._load(name, Path(path))
                with self._names:
                    self.adapters[name] = Path(path)

    def swap(self, alias: str, name: str | None, path: str | Path | None = None) -> str | None:
        """Point `alias` at adapter `name` (None = the base), loading it first; returns the previous target.

        Requests admitted before the swap finish on the old adapter; the old one is unloaded as
        soon as the last of them is done, so no request ever fails because of a swap."""
        if name is not None:
            if path is None and name not in self.adapters:
                raise ValueError(f"adapter {name!r} is not loaded and no path was given")
            self.load_adapter(name, path or self.adapters[name], pin=False)
        with self._model_lock, self._names:
            previous = self.aliases.get(alias)
            self.aliases[alias] = name or BASE_ADAPTER
            if previous not in (None, BASE_ADAPTER, *self.aliases.values(), *self._pinned):
                self._retired.add(previous)
        self._unload_retired()
        log.info("alias %s -> %s (was %s)", alias, name or "base", previous)
        return previous

    def _unload_retired(self) -> None:
        with self._model_lock:
            with self._names:
                idle = [a for a in self._retired if self._in_use[a] == 0]
            for name in idle:
                self.engine.remove_adapter(name)
                with self._names:
                    self._retired.discard(name)
                    self.adapters.pop(name, None)
                log.info("unloaded adapter %s", name)

    # --- requests -------------------------------------------------------------------------

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, model: str, prompt_ids: list[int], params: SamplingParams) -> Job:
        """Admit a request: resolve its model to an adapter and pin that adapter until it finishes.
        Resolving and pinning happen under one lock, so a concurrent swap can never unload it."""
        with self._names:
            adapter = self._resolve(model)
            self._in_use[adapter] += 1
        job = Job(
            prompt_ids, adapter, self.version_of(adapter), params, asyncio.get_running_loop(), asyncio.Queue()
        )
        self._queue.put(job)
        return job

    def _release(self, job: Job) -> None:
        with self._names:
            self._in_use[job.adapter] -= 1
            idle_retired = job.adapter in self._retired and self._in_use[job.adapter] == 0
        if idle_retired:
            self._queue.put(
                _SWEEP
            )  # the generation thread unloads it (it holds the model between decode steps)

    async def stream(self, job: Job, started: float | None = None) -> AsyncIterator[Delta | Generation]:
        """Yield `Delta`s of an admitted job as tokens arrive, then one final `Generation`."""
        started = started or time.perf_counter()
        params = job.params
        choices = [Choice(i) for i in range(params.n)]
        remaining = params.n
        try:
            while remaining:
                event = await job.events.get()
                if isinstance(event, BaseException):
                    raise event
                choice = choices[event.index]
                choice.text += event.text
                if event.finish_reason:
                    choice.finish_reason = event.finish_reason
                    choice.completion_tokens = event.completion_tokens
                    remaining -= 1
                yield event
        finally:
            job.cancelled = remaining > 0  # the client went away: stop spending compute on it
            self._release(job)
        yield Generation(job.version, len(job.prompt_ids), choices, time.perf_counter() - started)

    async def generate(self, model: str, prompt_ids: list[int], params: SamplingParams) -> Generation:
        result = None
        async for event in self.stream(self.submit(model, prompt_ids, params)):
            if isinstance(event, Generation):
                result = event
        assert result is not None
        return result

    # --- the decoding thread -------------------------------------------------------------

    def _take(self, block: bool) -> bool:
        """Admit queued jobs into the engine; False once asked to stop."""
        while True:
            try:
                item = self._queue.get(timeout=None) if block else self._queue.get_nowait()
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            if item == _SWEEP:
                self._unload_retired()
                continue
            assert isinstance(item, Job)
            adapter = None if item.adapter == BASE_ADAPTER else item.adapter
            p = item.params
            with self._model_lock:
                for index in range(p.n):
                    params = RowParams(
                        p.temperature, p.top_p, p.max_tokens, p.stop, seed=p.choice_seed(index)
                    )
                    seq = self.engine.add(item.prompt_ids, params, adapter)
                    self._rows[seq.id] = _Row(item, index, seq)

    def _run(self) -> None:
        if self.threads:
            # Per-thread under OpenMP: only the generation thread changes. On a shared CPU, fewer
            # threads than cores avoids OpenMP spin-waiting against other processes.
            torch.set_num_threads(self.threads)
        while True:
            idle = not self.engine.has_work()
            if not self._take(block=idle):
                break
            if idle and self.max_wait_s:
                time.sleep(self.max_wait_s)  # let a burst arrive together: one prefill for all
                if not self._take(block=False):
                    break
            for row in self._rows.values():
                if row.job.cancelled and not row.seq.done:
                    self.engine.abort(row.seq)
            try:
                with self._model_lock:
                    touched = self.engine.step()
                self.steps += 1
            except Exception as exc:  # one bad step must not kill the server
                log.exception("generation failed")
                self._fail_all(exc)
                continue
            for seq in touched:
                row = self._rows.get(seq.id)
                if row is not None and row.emit():
                    del self._rows[seq.id]
            for sid in [sid for sid, row in self._rows.items() if row.seq.done and row.emit()]:
                del self._rows[sid]  # aborted before they ever ran
        self._fail_all(RuntimeError("the generation engine is shutting down"))

    def _fail_all(self, exc: BaseException) -> None:
        jobs = {id(row.job): row.job for row in self._rows.values()}
        for row in self._rows.values():
            self.engine.abort(row.seq)
        with self._model_lock:
            self.engine.step()  # frees the aborted rows' slots
        self._rows.clear()
        for job in jobs.values():
            job.loop.call_soon_threadsafe(job.events.put_nowait, exc)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)
