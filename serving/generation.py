"""The generation engine: one base model, several LoRA adapters, batched requests, streaming.

A background thread owns the model. Requests queue up; the thread collects them for a few
milliseconds, left-pads them into one batch and runs ONE `generate` call for the whole batch,
whatever adapter each row asked for (PEFT's mixed-adapter batches via `adapter_names`). Per-row
sampling (temperature, top_p), per-row `max_tokens` and stop sequences are enforced by a logits
processor and a stopping criterion, so requests with different settings still share a batch.
Every new token is decoded as it is sampled and pushed to the waiting request's asyncio queue,
which is what both streaming and plain responses read.

Adapters are hot-swapped without failing a request: the new adapter is loaded under the model
lock (between two batches), the alias (`prefloop-current`) is repointed, and the old adapter is
unloaded only once no admitted request still refers to it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from alignment.devices import DevicePlan, plan_device
from alignment.models import load_causal_lm, load_tokenizer

log = logging.getLogger("prefloop.serving")

CURRENT_ALIAS = "prefloop-current"
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
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


@dataclass
class _Row:
    job: Job
    index: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far
    emitted: int = 0  # characters of `text` already sent
    done: bool = False
    # Incremental detokenization: re-decode only from `prefix_offset`, so each step costs O(1)
    # tokens, not O(length); text only grows once it no longer ends in a partial UTF-8 character.
    prefix_offset: int = 0
    read_offset: int = 0

    def decode_step(self, tokenizer: Any, flush: bool = False) -> None:
        prefix = tokenizer.decode(
            self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        new = tokenizer.decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(new) > len(prefix) and (flush or not new.endswith("\ufffd")):
            self.text += new[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop sequence."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class _RowTracker(StoppingCriteria):
    """Decodes each row's new token, emits text deltas, and decides per row when it is finished.

    It runs right after every decoding step, so it is the one place where EOS, stop sequences,
    per-row `max_tokens` and cancelled clients end a row; `generate` then pads that row.
    """

    def __init__(self, rows: list[_Row], tokenizer: Any, eos_ids: set[int]):
        self.rows, self.tokenizer, self.eos_ids = rows, tokenizer, eos_ids
        self.finished = torch.zeros(len(rows), dtype=torch.bool)

    def _emit(self, row: _Row, text: str, finish_reason: str | None = None) -> None:
        delta = Delta(row.index, text, finish_reason, len(row.tokens) if finish_reason else 0)
        row.job.loop.call_soon_threadsafe(row.job.events.put_nowait, delta)

    def _finish(self, i: int, reason: str) -> None:
        row = self.rows[i]
        row.done = True
        self.finished[i] = True
        row.decode_step(self.tokenizer, flush=True)
        text = row.text
        tail = text[row.emitted :]
        if reason == "stop" and row.job.params.stop:
            cut = min((p for s in row.job.params.stop if (p := text.find(s)) >= 0), default=len(text))
            tail = text[row.emitted : cut]
        self._emit(row, tail, reason)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        new_tokens = input_ids[:, -1].tolist()
        for i, (row, token) in enumerate(zip(self.rows, new_tokens, strict=True)):
            if row.done:
                continue
            if row.job.cancelled:
                self._finish(i, "cancelled")
                continue
            if token in self.eos_ids:
                self._finish(i, "stop")
                continue
            row.tokens.append(token)
            row.decode_step(self.tokenizer)
            text, stops = row.text, row.job.params.stop
            if stops and any(s in text[max(0, row.emitted - max(map(len, stops))) :] for s in stops):
                self._finish(i, "stop")
            elif len(row.tokens) >= row.job.params.max_tokens:
                self._finish(i, "length")
            else:
                safe = len(text) - _holdback(text, stops)
                if safe > row.emitted:
                    self._emit(row, text[row.emitted : safe])
                    row.emitted = safe
        return self.finished.to(input_ids.device)

    def close(self, reason: str = "length") -> None:
        for i, row in enumerate(self.rows):
            if not row.done:
                self._finish(i, reason)


class _PerRowSampling(LogitsProcessor):
    """Temperature and nucleus (top_p) per row; temperature 0 means greedy for that row."""

    def __init__(self, temperature: torch.Tensor, top_p: torch.Tensor):
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        greedy = self.temperature == 0
        if greedy.all():  # the common eval/test case: skip the vocabulary sort entirely
            return torch.full_like(scores, float("-inf")).scatter(1, scores.argmax(-1, keepdim=True), 0.0)
        scores = scores / self.temperature.clamp_min(1e-5)[:, None]
        nucleus = (self.top_p < 1) | greedy
        if nucleus.any():
            rows = scores[nucleus]
            sorted_scores, order = rows.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            # Drop a token when the tokens ranked above it already cover top_p (always keep the first).
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= self.top_p[nucleus, None]
            drop_sorted[greedy[nucleus], 1:] = True
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            scores[nucleus] = rows.masked_fill(drop, float("-inf"))
        return scores


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
    ):
        self.threads = threads
        self.plan = plan or plan_device()
        self.base_name = served_name or Path(model).name
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"
        self.model: Any = load_causal_lm(model, self.plan).eval()
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [self.tokenizer.eos_token_id])
        self.adapters: dict[str, Path] = {}  # loaded adapter name -> path
        self.aliases: dict[str, str] = {CURRENT_ALIAS: BASE_ADAPTER}
        self._in_use: Counter[str] = Counter()  # admitted requests per adapter
        self._retired: set[str] = set()  # adapters to unload once no request uses them
        self._pinned: set[str] = set()  # loaded explicitly: never retired by a swap
        self._names = threading.Lock()  # guards adapters/aliases/_in_use/_retired
        self._model_lock = threading.Lock()  # held while generating or changing adapters
        self._queue: queue.Queue[Job | str | None] = queue.Queue()  # None = stop
        self._carry: Job | None = None
        self.batches = 0
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
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(
                self.model, str(path), adapter_name=name, is_trainable=False
            )
        self.model.eval()
        # Keep adapter weights in the serving dtype: PEFT may upcast them, which costs a cast per step.
        self.model.to(self.plan.dtype)

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
                if list(self.model.peft_config) == [name]:
                    self.model = self.model.unload()  # the last adapter: back to the plain base model
                else:
                    self.model.delete_adapter(name)
                    # PEFT keeps a stale active adapter name after deleting it; generation would then fail.
                    if self.model.active_adapter not in self.model.peft_config:
                        self.model.set_adapter(next(iter(self.model.peft_config)))
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
            self._queue.put(_SWEEP)  # the generation thread unloads it (it holds the model between batches)

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

    # --- the batching thread --------------------------------------------------------------

    def _next(self, timeout: float | None = None) -> Job | str | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        return self._queue.get(timeout=timeout)

    def _collect(self) -> list[Job] | None:
        """Block for one job, then gather more for up to max_wait_ms, up to max_batch_size rows."""
        first = self._next()
        while first == _SWEEP:
            self._unload_retired()
            first = self._next()
        if first is None:
            return None
        assert isinstance(first, Job)
        batch, rows = [first], first.params.n
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_batch_size:
            try:
                job = self._next(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job == _SWEEP:
                continue  # the sweep after this batch covers it
            if job is None:
                self._queue.put(None)
                break
            assert isinstance(job, Job)
            if rows + job.params.n > self.max_batch_size:
                self._carry = job  # first in the next batch, so a large request is never starved
                break
            batch.append(job)
            rows += job.params.n
        return batch

    def _run(self) -> None:
        if self.threads:
            # Per-thread under OpenMP: only the generation thread changes. On a shared CPU, fewer
            # threads than cores avoids OpenMP spin-waiting against other processes.
            torch.set_num_threads(self.threads)
        while (batch := self._collect()) is not None:
            try:
                with self._model_lock:
                    self._generate(batch)
                self.batches += 1
            except Exception as exc:  # one bad batch must not kill the server
                log.exception("generation failed")
                for job in batch:
                    job.loop.call_soon_threadsafe(job.events.put_nowait, exc)
            self._unload_retired()

    @torch.inference_mode()
    def _generate(self, batch: list[Job]) -> None:
        rows = [_Row(job, i) for job in batch for i in range(job.params.n)]
        width = max(len(r.job.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.job.prompt_ids)) + r.job.prompt_ids for r in rows])
        attention_mask = torch.tensor(
            [[0] * (width - len(r.job.prompt_ids)) + [1] * len(r.job.prompt_ids) for r in rows]
        )
        device = self.plan.device
        tracker = _RowTracker(rows, self.tokenizer, self.eos_ids)
        sampling = _PerRowSampling(
            torch.tensor([r.job.params.temperature for r in rows], device=device),
            torch.tensor([r.job.params.top_p for r in rows], device=device),
        )
        config = GenerationConfig(
            do_sample=True,  # _PerRowSampling makes temperature-0 rows greedy
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max(r.job.params.max_tokens for r in rows),
            pad_token_id=pad,
            eos_token_id=sorted(self.eos_ids),
        )
        extra: dict[str, Any] = {}
        if hasattr(self.model, "peft_config"):
            extra["adapter_names"] = [r.job.adapter for r in rows]
        self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=[sampling],
            stopping_criteria=[tracker],
            **extra,
        )
        tracker.close()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)
