"""The generation engine: continuous batching over a static KV cache.

Sequences are added at any time (`add`) and run in decode steps (`step`): between two steps,
finished sequences leave and waiting ones are prefilled into free cache slots, so no sequence
waits for another's long answer. Every row has its own temperature, top_p, max_tokens, stop
sequences and LoRA adapter; log-probs of the sampled tokens are kept when asked.

`generate` is the offline entry point (PPO rollouts, `annotate push`, `prefloop eval`);
`prefloop serve` drives `add`/`step` from its own thread (serving/generation.py).

Backends: this module is the "native" backend (the Llama-family forward in `llama.py`). A
backend for GPU machines (vLLM) would implement the same four calls (`add`, `step`, `abort`,
`generate`) plus `load_adapter`/`remove_adapter`, and be chosen by `load_engine(backend=...)`;
none ships until a test has run it.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from alignment.generation import llama
from alignment.generation.lora import Adapter, RowLora, adapters_of, load_adapter_files
from alignment.generation.sampling import sample

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop sequences (need the engine's tokenizer)
    logprobs: bool = False  # keep the log-prob of each sampled token
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    seed: int | None = None  # this row samples from its own generator: same seed, same answer


@dataclass
class Sequence:
    """One prompt being answered: what the engine has produced so far."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # a loaded adapter's name; None = the base model
    id: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # decoded so far (when the engine has a tokenizer)
    finish_reason: FinishReason | None = None
    eos_token: int | None = None  # the EOS token that ended it (not in `tokens`)
    # Incremental detokenization: re-decode only from `prefix_offset`, so a step costs O(1)
    # tokens, not O(length); text grows only once it no longer ends in a partial UTF-8 character.
    prefix_offset: int = 0
    read_offset: int = 0
    generator: torch.Generator | None = None  # from params.seed

    def __post_init__(self) -> None:
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def decode_step(self, tokenizer: Any, flush: bool = False) -> None:
        prefix = tokenizer.decode(
            self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        new = tokenizer.decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(new) > len(prefix) and (flush or not new.endswith("\ufffd")):
            self.text += new[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)


@dataclass
class StepStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0


class Engine:
    """Continuous-batching generation on one model (the "native" backend).

    model: an HF Llama-family causal LM, plain or PEFT-wrapped (its LoRA adapters are taken as
    loaded adapters by name). The engine reads the model's tensors in place, so a policy being
    trained is sampled with its current weights; call `refresh_adapters()` after an optimizer
    step when the policy's LoRA weights changed (they are copied: small).

    merged_copies: a batch whose rows all use one adapter (the usual case for the server, and
    every PPO/push/eval batch) decodes on a copy of the weights with that adapter merged in
    (W + B A rounded once to the dtype): one matmul per projection instead of the LoRA path's
    two. Copies are built on first use and kept for the `merged_copies` most recently used
    adapters (each costs the projections' size again: 212 MB for SmolLM2-135M in bf16); 0
    turns this off. A reloaded, replaced or removed adapter drops its copy. Batches that mix
    adapters (or adapters and the base model) keep the per-row path.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any | None = None,
        max_batch_size: int = 16,
        eos_token_ids: Iterable[int] | None = None,
        merge_adapter: str | None = None,
        merged_copies: int = 2,
    ):
        self.model = model
        self.base_weights = llama.LlamaWeights(model)
        self.weights = self.base_weights
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        if eos_token_ids is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            if eos is None and tokenizer is not None:
                eos = tokenizer.eos_token_id
            eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = set(eos_token_ids)
        self.adapters: dict[str, Adapter] = {}
        self.merged: str | None = None
        # For mixed-adapter batches (`_row_lora`); dropped whenever the adapters change.
        self._fused: llama.LlamaWeights | None = None
        self.merged_copies = merged_copies
        # adapter name -> (the Adapter it was built from, merged weights); least recent first.
        self._merged_cache: OrderedDict[str, tuple[Adapter, llama.LlamaWeights]] = OrderedDict()
        self.refresh_adapters()
        self.cache = self.weights.new_cache(max_batch_size, 256)
        self.running: list[Sequence] = []  # row i of the batch = cache slot i
        self.waiting: deque[Sequence] = deque()
        self._lengths: list[int] = []  # cached positions per running row
        self._next_token: torch.Tensor | None = None  # [rows] token each row feeds next
        self._lora: tuple[llama.LlamaWeights, RowLora] | None = None  # the running batch's
        self._params: tuple[torch.Tensor, torch.Tensor] | None = None
        self._ids = 0
        self.generator: torch.Generator | None = None
        self.stats = StepStats()
        if merge_adapter is not None:
            self.merge(merge_adapter)

    # --- adapters -------------------------------------------------------------------------

    def refresh_adapters(self) -> None:
        """Re-read the LoRA weights of a PEFT-wrapped model (e.g. after a training step)."""
        live = adapters_of(self.model, self.base_weights.dtype)
        self.adapters.update(live)
        for name in live:
            self._merged_cache.pop(name, None)
        if self.merged is not None and self.merged in live:
            self.weights = self._merged_weights(self.adapters[self.merged])
        self._lora, self._fused = None, None

    def refresh(self, merge: str | None = None) -> None:
        """Re-read all weights of the model (a policy after optimizer steps): the fused base
        projections and the LoRA adapters; then sample with adapter `merge` merged (or none)."""
        if self.running or self.waiting:
            raise RuntimeError("refresh() between generations only")
        self.base_weights = llama.LlamaWeights(self.model)
        self.weights, self.merged = self.base_weights, None
        self._merged_cache.clear()  # built on the old base weights
        self.refresh_adapters()
        self.merge(merge)

    def load_adapter(self, name: str, path: str | Path) -> None:
        w = self.base_weights
        self.adapters[name] = load_adapter_files(name, path, w.dtype, w.device)
        self._merged_cache.pop(name, None)
        self._lora, self._fused = None, None

    def remove_adapter(self, name: str) -> None:
        if any(s.adapter == name and not s.done for s in (*self.running, *self.waiting)):
            raise ValueError(f"adapter {name!r} is still used by a running sequence")
        self.adapters.pop(name, None)
        self._merged_cache.pop(name, None)
        self._lora, self._fused = None, None

    def merge(self, name: str | None) -> None:
        """Sample with `name` merged into a copy of the weights (one adapter for every row: PPO
        rollouts); None goes back to per-row LoRA on the shared base weights."""
        if self.running or self.waiting:
            raise RuntimeError("merge() between generations only")
        self.merged = name
        self.weights = self.base_weights if name is None else self._merged_weights(self.adapters[name])
        self._lora, self._fused = None, None

    def _merged_weights(self, adapter: Adapter) -> llama.LlamaWeights:
        """The base weights with `adapter` merged in, from the LRU cache (built on a miss; with
        the cache off, a fresh copy for an explicit `merge`)."""
        entry = self._merged_cache.get(adapter.name)
        if entry is not None and entry[0] is adapter:  # not a stale copy of a replaced adapter
            self._merged_cache.move_to_end(adapter.name)
            return entry[1]
        weights = self.base_weights.merged(adapter)
        if self.merged_copies > 0:
            self._merged_cache[adapter.name] = (adapter, weights)
            while len(self._merged_cache) > self.merged_copies:
                self._merged_cache.popitem(last=False)
        return weights

    # --- scheduling -----------------------------------------------------------------------

    def add(self, prompt_ids: Seq[int], params: SamplingParams, adapter: str | None = None) -> Sequence:
        if not prompt_ids:
            raise ValueError("a prompt needs at least one token")
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop sequences need an engine with a tokenizer")
        self._ids += 1
        seq = Sequence(list(prompt_ids), params, adapter, id=self._ids)
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Finish `seq` now ("cancelled"); its slot is freed at the next step."""
        if not seq.done:
            seq.finish_reason = "cancelled"
            if seq in self.waiting:
                self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[Sequence]:
        """Admit waiting sequences into free slots (prefill), then run one decode step for all
        running rows. Returns the sequences that got a token or finished in this step."""
        touched: list[Sequence] = []
        with torch.inference_mode():
            self._evict()
            touched += self._admit()
            if any(not s.done for s in self.running):
                touched += self._decode()
            self._evict()
        return list({id(s): s for s in touched}.values())

    def generate(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams],
        adapters: str | Seq[str | None] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Sequence]:
        """Answer every prompt (more prompts than slots simply queue); results in prompt order."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        adapter_list = (
            [adapters] * len(prompts) if adapters is None or isinstance(adapters, str) else list(adapters)
        )
        self.generator = generator
        seqs = [self.add(p, s, a) for p, s, a in zip(prompts, params_list, adapter_list, strict=True)]
        while any(not s.done for s in seqs):
            self.step()
        return seqs

    # --- internals ------------------------------------------------------------------------

    def _row_lora(self, seqs: list[Sequence]) -> tuple[llama.LlamaWeights, RowLora]:
        """The weights and LoRA for a batch of `seqs`. On packed bf16 CPU weights a batch with
        any adapter runs on a copy with every loaded adapter's A fused into the packed
        projections (`LlamaWeights.with_adapters`; rebuilt, one repack of the model, when the
        adapters changed): one call fewer per projection than the adapter's own A/B, which
        outweighed the other adapters' wasted columns (bench/README.md)."""
        adapters = [self._adapter(s) for s in seqs]
        first = adapters[0]
        if first is not None and self.merged_copies > 0 and all(a is first for a in adapters):
            # One adapter for every row: decode on its merged copy (see the class docstring).
            return self._merged_weights(first), RowLora([None] * len(seqs), self.weights.sizes)
        if any(a is not None for a in adapters) and self.base_weights.prepack and self.merged is None:
            if self._fused is None:
                self._fused = self.base_weights.with_adapters(list(self.adapters.values()))
            return self._fused, RowLora(adapters, self.weights.sizes, fused=True)
        return self.weights, RowLora(adapters, self.weights.sizes)

    def _adapter(self, seq: Sequence) -> Adapter | None:
        if seq.adapter is None or seq.adapter == self.merged:
            return None  # merged adapters live in the weights themselves
        return self.adapters[seq.adapter]

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        if self.tokenizer is not None:
            seq.decode_step(self.tokenizer, flush=True)
            if reason == "stop" and seq.params.stop:
                cut = min((p for s in seq.params.stop if (p := seq.text.find(s)) >= 0), default=len(seq.text))
                seq.text = seq.text[:cut]

    def _evict(self) -> None:
        """Drop finished rows, keeping running rows packed in slots 0..n-1."""
        i = 0
        changed = False
        while i < len(self.running):
            if not self.running[i].done:
                i += 1
                continue
            changed = True
            last = len(self.running) - 1
            if i != last:
                self.cache.move(last, i, self._lengths[last])
                self.running[i], self._lengths[i] = self.running[last], self._lengths[last]
                if self._next_token is not None:
                    self._next_token[i] = self._next_token[last]
            self.running.pop()
            self._lengths.pop()
            if self._next_token is not None:
                self._next_token = self._next_token[: len(self.running)]
        if changed:
            self._lora = self._params = None

    def _admit(self) -> list[Sequence]:
        free = self.max_batch_size - len(self.running)
        new: list[Sequence] = []
        while self.waiting and len(new) < free:
            seq = self.waiting.popleft()
            if not seq.done:
                new.append(seq)
        if not new:
            return []
        start = time.perf_counter()
        need = max(len(s.prompt_ids) + s.params.max_tokens for s in (*self.running, *new))
        self.cache.reserve(self.max_batch_size, need)
        w, lora = self._row_lora(new)
        width = max(len(s.prompt_ids) for s in new)
        ids = torch.zeros(len(new), width, dtype=torch.long)
        for r, s in enumerate(new):
            ids[r, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
        lengths = torch.tensor([len(s.prompt_ids) for s in new])
        first = len(self.running)
        slots = torch.arange(first, first + len(new))
        positions = torch.arange(width)[None].expand(len(new), width)
        logits = llama.forward(
            w, self.cache, ids.to(w.device), positions.to(w.device), lora,
            slots=slots.to(w.device), lengths=lengths.to(w.device), last=(lengths - 1).to(w.device),
        )  # fmt: skip
        self.running += new
        self._lengths += lengths.tolist()
        self._lora = self._params = None
        temperature, top_p = self._row_params(new)
        tokens = self._accept(new, logits, temperature, top_p)
        self._next_token = tokens if self._next_token is None else torch.cat([self._next_token, tokens])
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.prefill_tokens += int(lengths.sum())
        return new

    def _row_params(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.weights.device
        return (
            torch.tensor([s.params.temperature for s in seqs], device=device),
            torch.tensor([s.params.top_p for s in seqs], device=device),
        )

    def _accept(
        self, seqs: list[Sequence], logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor
    ) -> torch.Tensor:
        """Sample one token per row and apply each row's stopping rules."""
        want = any(s.params.logprobs for s in seqs)
        uniforms = None
        if any(s.generator is not None for s in seqs):
            draws = torch.rand(len(seqs), generator=self.generator)
            for r, seq in enumerate(seqs):
                if seq.generator is not None:
                    draws[r] = torch.rand((), generator=seq.generator)
            uniforms = draws
        tokens, logprobs = sample(logits, temperature, top_p, self.generator, want, uniforms)
        token_list = tokens.tolist()
        lp_list = logprobs.tolist() if logprobs is not None else None
        for r, seq in enumerate(seqs):
            if seq.done:  # cancelled while running
                continue
            token = token_list[r]
            if token in self.eos_ids and not seq.params.ignore_eos:
                seq.eos_token = token
                self._finish(seq, "stop")
                continue
            seq.tokens.append(token)
            if lp_list is not None and seq.params.logprobs:
                seq.logprobs.append(lp_list[r])
            scanned = len(seq.text)
            if self.tokenizer is not None:
                seq.decode_step(self.tokenizer)
            stops = seq.params.stop
            if stops and any(s in seq.text[max(0, scanned - len(s) + 1) :] for s in stops):
                self._finish(seq, "stop")
            elif len(seq.tokens) >= seq.params.max_tokens:
                self._finish(seq, "length")
        return tokens

    def _decode(self) -> list[Sequence]:
        start = time.perf_counter()
        rows = len(self.running)
        assert self._next_token is not None and len(self._next_token) == rows
        if self._lora is None:
            self._lora = self._row_lora(self.running)
        if self._params is None:
            self._params = self._row_params(self.running)
        w, lora = self._lora
        positions = torch.tensor(self._lengths, device=w.device)[:, None]
        need = max(self._lengths) + 1
        if need > self.cache.capacity:
            self.cache.reserve(self.max_batch_size, need)
        logits = llama.forward(w, self.cache, self._next_token[:, None].to(w.device), positions, lora)
        for r in range(rows):
            self._lengths[r] += 1
        self._next_token = self._accept(self.running, logits, *self._params)
        self.stats.decode_s += time.perf_counter() - start
        self.stats.decode_steps += 1
        self.stats.decode_tokens += rows
        return list(self.running)
