"""Preference pairs packed so that shared prompt tokens run once.

    packed = pack_pairs(prompts, chosen, rejected)          # lists of 1-D token tensors
    hidden = transformer(input_ids=packed.input_ids, position_ids=packed.position_ids,
                         attention_mask=packed.attention_mask).last_hidden_state

The two sequences of a pair share their prompt, and the prompts of a batch usually share a prefix
too (a chat template's system prompt: 24 of SmolLM2's ~75 tokens a pair on the bundled data). A
packed row is

    [batch prefix | rest of prompt 1 | chosen 1 | rejected 1 | rest of prompt 2 | chosen 2 | ...]

with position ids that restart where each sequence would have them and a mask under which every
token sees exactly the context it has in its own full sequence: a pair's tokens see the batch prefix
and their own pair, and a rejected token never sees its chosen twin. The numbers are those of the
2B full sequences, for the cost of their distinct tokens. Rows hold about `row_tokens` tokens,
filled evenly. The DPO trainer (log-probs of completion tokens), the reward trainer (a score at each
side's last token) and the reward scorer all run their pairs this way.

Attention costs what the sequences cost (`segment_attention`): the model's attention is switched to
SEGMENT_ATTENTION (`use_segment_attention`) and the forward gets `pair_segments=packed.segments`
instead of a (rows, 1, T, T) mask. Each layer then attends per sequence: the batch prefix over itself,
[prefix | prompt | chosen] causally, and the rejected tokens over [prefix | prompt | rejected]. No
rows x heads x T x T score tensor of a whole row is built, and padding costs nothing. On CPU each
segment runs eager attention (its backward is plain matmuls: measured faster than PyTorch's CPU
flash kernel, whose backward took 30% of a long-pair reward step with the full-row mask, and
flex attention has no CPU backward in torch 2.13); on GPUs each segment is one SDPA call. Without
`pair_segments` the same attention is plain SDPA, so unpacked calls still work. On CPU, when the
scores of all sequences of a forward fit a small budget (short pairs, PPO rollouts), the sequences
attend in one batched call instead of a loop of small matmuls (`_batched_attention`): each
sequence's keys gathered to the front of its own batch row, padding masked after them. That gives
the loop's numbers bit for bit (tested on SmolLM2 in bf16) for a fraction of its per-call overhead
(bundled DPO pairs: fwd + bwd 1.00 -> 0.78 CPU-s a pair per row, 0.61 with the batch prefix shared).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SEGMENT_ATTENTION = "prefloop_segments"
ROW_TOKENS = 256  # measured: a little faster than 512 on SmolLM2 (less attention over masked blocks)
# On CPU all sequences of a forward attend in one batched call when their kept scores (fp32 softmax and
# bf16 weights, every layer) fit in this many bytes (`batched_attention_pays`); else one at a time.
BATCHED_SCORES_BYTES = 512 * 2**20
SHORT_QUERIES = 32  # sequences with at most this many queries (rejected sides) batch apart from the rest
BATCHED_MAX_WASTE = 3.0  # ... and only when padding at most triples the scores computed


@dataclass(frozen=True)
class PairPlace:
    """Where one pair sits: its row, where its own prompt tokens start, and its segment lengths."""

    row: int
    start: int  # index in the row of the first token after the batch prefix
    prefix: int  # the row's shared batch prefix length
    prompt: int  # prompt tokens beyond the batch prefix
    chosen: int
    rejected: int

    @property
    def chosen_start(self) -> int:
        return self.start + self.prompt

    @property
    def rejected_start(self) -> int:
        return self.chosen_start + self.chosen

    @property
    def end(self) -> int:
        return self.rejected_start + self.rejected

    @property
    def prompt_last(self) -> int:
        """Index of the last prompt token: it predicts both completions' first tokens."""
        return self.start + self.prompt - 1 if self.prompt else self.prefix - 1


@dataclass
class PackedPairs:
    input_ids: torch.Tensor  # (rows, T), right-padded with pad_id
    position_ids: torch.Tensor  # (rows, T)
    token_mask: torch.Tensor  # (rows, T) long, 1 for real tokens, 0 for padding
    places: list[PairPlace]
    pair: torch.Tensor  # (rows, T) the pair of each token; -1: batch prefix, -2: padding
    chosen_token: torch.Tensor  # (rows, T) bool
    rejected_token: torch.Tensor  # (rows, T) bool

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def segments(self) -> torch.Tensor:
        """(B, 6) long: row, start, prefix, prompt, chosen, rejected of each pair (`segment_attention`)."""
        return torch.tensor(
            [[p.row, p.start, p.prefix, p.prompt, p.chosen, p.rejected] for p in self.places],
            dtype=torch.long,
        )

    @property
    def attention_mask(self) -> torch.Tensor:
        """(rows, 1, T, T) bool, True = may attend: the same context as a ready 4-D mask (eager/SDPA)."""
        width = self.width
        device = self.input_ids.device
        q = torch.arange(width, device=device)[:, None]
        k = torch.arange(width, device=device)[None, :]
        pair_q, pair_k = self.pair[:, :, None], self.pair[:, None, :]
        real_k = pair_k != -2
        mask = (
            (k <= q)
            & real_k
            & ((pair_k == -1) | (pair_k == pair_q) | (pair_q == -2))  # padding queries look at anything real
            & ~(self.rejected_token[:, :, None] & self.chosen_token[:, None, :])
        )
        return mask[:, None]

    def flat(self, place: PairPlace, index: torch.Tensor | int) -> torch.Tensor:
        return place.row * self.width + torch.as_tensor(index, device=self.input_ids.device)

    def last_token_index(self) -> torch.Tensor:
        """(2B,) flat indices into (rows*T) of each chosen completion's last token, then each rejected one's."""
        chosen = [self.flat(p, p.rejected_start - 1) for p in self.places]
        rejected = [self.flat(p, p.end - 1) for p in self.places]
        return torch.stack(chosen + rejected)

    def predictor_index(self, place: PairPlace, side: str) -> torch.Tensor:
        """Flat indices of the hidden states that predict each token of one completion, in order."""
        start, length = (
            (place.chosen_start, place.chosen) if side == "chosen" else (place.rejected_start, place.rejected)
        )
        previous = torch.arange(start - 1, start + length - 1, device=self.input_ids.device)
        previous[0] = place.prompt_last  # the first completion token follows the prompt, not its twin
        return self.flat(place, previous)


def common_prefix(seqs: Sequence[torch.Tensor]) -> int:
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest and all(s[n] == seqs[0][n] for s in seqs[1:]):
        n += 1
    return n


def pack_pairs(
    prompts: Sequence[torch.Tensor],
    chosen: Sequence[torch.Tensor],
    rejected: Sequence[torch.Tensor],
    pad_id: int = 0,
    row_tokens: int | None = ROW_TOKENS,
    across_pairs: bool = True,
) -> PackedPairs:
    """Pack B (prompt, chosen, rejected) token sequences (1-D tensors) into rows of about `row_tokens`
    (None: all pairs in one row, no padding).

    `across_pairs=False`: one row per pair, [prompt | chosen | rejected]. A pair's numbers then do not
    depend on which pairs share its batch; packed together, bf16 sums over a row change with its
    layout (DPO's cached reference log-ratios moved by 0.2 nats on average on SmolLM2).
    """
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise ValueError("pack_pairs needs the same positive number of prompts, chosen and rejected")
    device = prompts[0].device
    # The batch prefix; a pair needs a token of its own after it only if its prompt is longer.
    prefix = 0 if not across_pairs else common_prefix(prompts) if len(prompts) > 1 else len(prompts[0])
    sizes = [len(p) - prefix + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    # As few rows as fit, filled evenly: every row is padded to the longest.
    n_rows = 1 if row_tokens is None else -(-sum(sizes) // max(1, row_tokens - prefix))
    target = sum(sizes) / n_rows
    places: list[PairPlace] = []
    row, used = 0, prefix
    for b, size in enumerate(sizes):
        if used > prefix and (not across_pairs or used - prefix + size / 2 > target):
            row, used = row + 1, prefix
        places.append(
            PairPlace(row, used, prefix, len(prompts[b]) - prefix, len(chosen[b]), len(rejected[b]))
        )
        used += size
    rows = row + 1
    width = max(place.end for place in places)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    position_ids = torch.zeros((rows, width), dtype=torch.long, device=device)
    pair = torch.full((rows, width), -2, dtype=torch.long, device=device)  # -1: batch prefix, -2: padding
    chosen_token = torch.zeros((rows, width), dtype=torch.bool, device=device)
    rejected_token = torch.zeros((rows, width), dtype=torch.bool, device=device)
    input_ids[:, :prefix] = prompts[0][:prefix]
    position_ids[:, :prefix] = torch.arange(prefix, device=device)
    pair[:, :prefix] = -1
    for b, place in enumerate(places):
        input_ids[place.row, place.start : place.end] = torch.cat(
            [prompts[b][prefix:], chosen[b], rejected[b]]
        )
        completion_pos = prefix + place.prompt
        position_ids[place.row, place.start : place.rejected_start] = torch.arange(
            prefix, completion_pos + place.chosen, device=device
        )
        position_ids[place.row, place.rejected_start : place.end] = torch.arange(
            completion_pos, completion_pos + place.rejected, device=device
        )
        pair[place.row, place.start : place.end] = b
        chosen_token[place.row, place.chosen_start : place.rejected_start] = True
        rejected_token[place.row, place.rejected_start : place.end] = True
    token_mask = (pair != -2).long()
    return PackedPairs(input_ids, position_ids, token_mask, places, pair, chosen_token, rejected_token)


def mask_for_attention(mask: torch.Tensor, model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The packed boolean mask in the form the model's attention takes as a ready 4-D mask.

    SDPA and flex take booleans; eager attention adds the mask to its scores, so it needs 0 / -inf.
    """
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )
    return mask


# --- attention per sequence ---------------------------------------------------------------------------


def _causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, keep_scores: bool = False
) -> torch.Tensor:
    """(H, Lq, D) queries that are the last Lq of Lk keys (KV heads, Lk, D), each seeing the keys up to its own position."""
    lq, lk = query.shape[-2], key.shape[-2]
    if query.device.type != "cpu":
        groups = query.shape[0] // key.shape[0]
        key, value = key.repeat_interleave(groups, dim=0), value.repeat_interleave(groups, dim=0)
        mask = None if lq == lk else torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=lq == lk, scale=scaling
        )
    if torch.is_grad_enabled() and query.requires_grad and not keep_scores:
        # Keep q, k, v for the backward and recompute the (H, Lq, Lk) scores there: the saved fp32
        # softmax and bf16 weights were ~1.6 GB of a long-pair reward step, the recompute ~5% of it.
        # Under a token budget (the reward trainer's micro-batches) keeping them is cheaper.
        return checkpoint(_eager_causal, query, key, value, scaling, use_reentrant=False)
    return _eager_causal(query, key, value, scaling)


@functools.lru_cache(maxsize=32)
def _future_bias(rows: int, lq: int, lk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(rows * Lq, Lk) additive causal mask, `rows` copies stacked: built once, reused by every layer."""
    future = torch.ones(lq, lk, dtype=torch.bool, device=device).triu(lk - lq + 1)
    bias = torch.zeros(lq, lk, dtype=dtype, device=device).masked_fill_(future, torch.finfo(dtype).min)
    return bias.repeat(rows, 1)


def _eager_causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Eager, as transformers' eager attention computes it (fp32 softmax), for one sequence's keys only.

    The query heads that share a KV head are stacked into one (groups * Lq, D) matrix, so keys and
    values are never repeated, and the scale and the mask are one `baddbmm` with a cached bias (no
    masked_fill in the forward or the backward).
    """
    heads, lq, dim = query.shape
    kv_heads, lk = key.shape[0], key.shape[-2]
    groups = heads // kv_heads
    bias = _future_bias(groups, lq, lk, query.dtype, query.device)
    scores = torch.baddbmm(
        bias, query.reshape(kv_heads, groups * lq, dim), key.transpose(-1, -2), alpha=scaling
    )
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).view(heads, lq, dim)


@dataclass(frozen=True)
class _Sequence:
    """One sequence of a packed row: its keys, as runs of row positions in order, and its queries
    (the last `queries` keys)."""

    row: int
    spans: tuple[tuple[int, int], ...]  # [start, stop) runs of row positions
    queries: int

    @property
    def keys(self) -> int:
        return sum(stop - start for start, stop in self.spans)


def _sequences(segments: Sequence[Sequence[int]]) -> list[_Sequence]:
    """Every sequence of the packed rows: the batch prefix once per row, then each pair's
    [prefix | prompt | chosen] and [prefix | prompt | rejected], as the per-sequence loop runs them."""
    out: list[_Sequence] = []
    prefixed: set[int] = set()
    for row, start, prefix, prompt, chosen, rejected in segments:
        head = ((0, prefix),) if prefix else ()
        if prefix and row not in prefixed:
            prefixed.add(row)
            out.append(_Sequence(row, head, prefix))
        own = start + prompt  # the first completion token
        out.append(_Sequence(row, (*head, (start, own + chosen)), prompt + chosen))
        if rejected:  # PPO packs (prompt, response) with no rejected side
            out.append(
                _Sequence(row, (*head, (start, own), (own + chosen, own + chosen + rejected)), rejected)
            )
    return out


def _query_groups(sequences: list[_Sequence]) -> list[list[_Sequence]]:
    """The sequences batched together: those with many queries, and the short runs (rejected sides)."""
    groups = (
        [s for s in sequences if s.queries > SHORT_QUERIES],
        [s for s in sequences if s.queries <= SHORT_QUERIES],
    )
    return [group for group in groups if group]


@dataclass(frozen=True)
class _SequenceBatch:
    """Sequences attending in one batched call. Each one's keys are gathered to the front of its own
    row of `keys` (padding after them, masked by `bias`), and its queries are its last keys: the
    per-sequence loop's numbers, bit for bit (same key order and grouping; trailing masked keys and
    padded queries change no sum)."""

    keys: torch.Tensor  # (S, LK) flat (rows * T) index of each sequence's keys, padding -> 0
    queries: torch.Tensor  # (S, LQ) flat index of its queries (the last Lq keys), padding -> 0
    bias: torch.Tensor  # (S * KV, groups * LQ, LK) additive mask: causal, padding keys -inf


@functools.lru_cache(maxsize=16)
def _sequence_batches(
    segments: tuple[tuple[int, ...], ...],
    rows: int,
    width: int,
    kv_heads: int,
    groups: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[tuple[_SequenceBatch, ...], torch.Tensor]:
    """The packed rows' sequences as batches (`_query_groups`), and for every flat (rows * T)
    position the slot of its output among the batches' (padding: one past the last, a zero row).
    Built once per forward and reused by every layer."""
    batches = []
    slots = torch.full((rows * width,), -1, dtype=torch.long)
    offset = 0
    for group in _query_groups(_sequences(segments)):
        lk = max(seq.keys for seq in group)
        lq = max(seq.queries for seq in group)
        keys = torch.zeros((len(group), lk), dtype=torch.long)
        queries = torch.zeros((len(group), lq), dtype=torch.long)
        bias = torch.full((len(group), lq, lk), torch.finfo(dtype).min, dtype=dtype)
        for i, seq in enumerate(group):
            length, n = seq.keys, seq.queries
            keys[i, :length] = torch.cat([torch.arange(a, b) for a, b in seq.spans]) + seq.row * width
            queries[i, :n] = keys[i, length - n : length]
            slots[queries[i, :n]] = offset + i * lq + torch.arange(n)
            # query j (the (length - n + j)-th key) sees keys up to its own position
            visible = torch.arange(lk)[None, :] <= (length - n + torch.arange(lq))[:, None]
            bias[i].masked_fill_(visible & (torch.arange(lk)[None, :] < length), 0)
        offset += len(group) * lq
        bias = bias[:, None, None].expand(len(group), kv_heads, groups, lq, lk).reshape(-1, groups * lq, lk)
        batches.append(_SequenceBatch(keys.to(device), queries.to(device), bias.contiguous().to(device)))
    return tuple(batches), torch.where(slots < 0, offset, slots).to(device)


@functools.lru_cache(maxsize=64)
def _batched_scores(segments: tuple[tuple[int, ...], ...]) -> tuple[int, int]:
    """Scores per head `_batched_attention` computes for these segments (padding included), and
    those the sequences need."""
    sequences = _sequences(segments)
    padded = sum(
        len(group) * max(seq.keys for seq in group) * max(seq.queries for seq in group)
        for group in _query_groups(sequences)
    )
    return padded, sum(seq.keys * seq.queries for seq in sequences)


def batched_attention_pays(segments: tuple[tuple[int, ...], ...], heads: int, layers: int) -> bool:
    """Whether all sequences attend in one batched call, their scores kept for the backward, within
    BATCHED_SCORES_BYTES over the model's layers and not mostly padding; else the per-sequence loop.
    Same numbers either way."""
    padded, needed = _batched_scores(segments)
    # mostly padding: the loop is faster (2x on long pairs of mixed lengths, measured in the scorer)
    kept = padded * heads * 6 * layers  # fp32 softmax + bf16 weights per score, every layer
    return padded <= BATCHED_MAX_WASTE * needed and kept <= BATCHED_SCORES_BYTES


def _batched_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: tuple[tuple[int, ...], ...],
    scale: float,
) -> torch.Tensor:
    """All sequences of the packed rows in one batched eager attention (per batch of `_sequence_batches`).

    query (rows, H, T, D), key/value (rows, KV, T, D) -> (rows, T, H, D), padding positions zero.
    """
    rows, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    batches, slots = _sequence_batches(segments, rows, width, kv_heads, groups, query.dtype, query.device)
    flat_q = query.transpose(1, 2).reshape(rows * width, heads, dim)
    flat_k = key.transpose(1, 2).reshape(rows * width, kv_heads, dim)
    flat_v = value.transpose(1, 2).reshape(rows * width, kv_heads, dim)
    outputs = []
    for batch in batches:
        n, lk = batch.keys.shape
        lq = batch.queries.shape[1]
        # index_select, not advanced indexing: its backward is index_add (index_put's was 5% of a step)
        keys, queries = batch.keys.flatten(), batch.queries.flatten()
        k = flat_k.index_select(0, keys).view(n, lk, kv_heads, dim).transpose(1, 2).reshape(-1, lk, dim)
        v = flat_v.index_select(0, keys).view(n, lk, kv_heads, dim).transpose(1, 2).reshape(-1, lk, dim)
        q = flat_q.index_select(0, queries).view(n, lq, heads, dim).transpose(1, 2)
        q = q.reshape(n * kv_heads, groups * lq, dim)
        scores = torch.baddbmm(batch.bias, q, k.transpose(-1, -2), alpha=scale)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.bmm(weights, v).view(n, heads, lq, dim).transpose(1, 2)
        outputs.append(out.reshape(n * lq, heads, dim))
    outputs.append(query.new_zeros(1, heads, dim))  # what padding positions read
    return torch.cat(outputs).index_select(0, slots).view(rows, width, heads, dim)


def _keys(
    k_parts: Sequence[torch.Tensor], v_parts: Sequence[torch.Tensor], *indices: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values (KV heads, Lk, D), from the row's pieces."""
    k, v = (torch.cat([parts[i] for i in indices], dim=1) for parts in (k_parts, v_parts))
    return k, v


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    pair_segments: torch.Tensor | None = None,
    keep_attention_scores: bool = False,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention over packed pairs, one sequence at a time (module docstring); SDPA without segments.

    query (rows, H, T, D), key/value (rows, KV heads, T, D); returns (rows, T, H, D) like transformers'
    attention functions. Padding positions get zeros. `keep_attention_scores`: save each sequence's
    scores for the backward instead of recomputing them (faster; for callers whose tokens per forward
    are capped, like the reward trainer's micro-batches).
    """
    if pair_segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _, heads, width, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    segments = tuple(tuple(segment) for segment in pair_segments.tolist())
    if query.device.type == "cpu" and batched_attention_pays(
        segments, heads, getattr(module.config, "num_hidden_layers", 1)
    ):
        return _batched_attention(query, key, value, segments, scale), None
    keep = keep_attention_scores
    by_row: dict[int, list[tuple[int, ...]]] = {}
    for segment in segments:
        by_row.setdefault(segment[0], []).append(segment)
    outputs = []
    for row, (q_row, k_row, v_row) in enumerate(zip(query, key, value, strict=True)):
        in_row = by_row.get(row, [])
        # One split per row into [prefix, (prompt, chosen, rejected) per pair, padding]: its backward is
        # a single concatenation, where slicing each piece would zero-fill a full-size gradient per slice.
        prefix = in_row[0][2] if in_row else 0
        sizes = [prefix] + [n for _, _, _, *lengths in in_row for n in lengths]
        sizes.append(width - sum(sizes))
        q_parts, k_parts, v_parts = (t.split(sizes, dim=1) for t in (q_row, k_row, v_row))
        pieces = []
        if prefix:
            pieces.append(_causal_attention(q_parts[0], *_keys(k_parts, v_parts, 0), scale, keep))
        for i in range(len(in_row)):
            prompt, chosen, rejected = 1 + 3 * i, 2 + 3 * i, 3 + 3 * i
            own = (0,) if prefix else ()
            queries = torch.cat([q_parts[prompt], q_parts[chosen]], dim=1)
            k, v = _keys(k_parts, v_parts, *own, prompt, chosen)
            pieces.append(_causal_attention(queries, k, v, scale, keep))
            if in_row[i][5]:  # PPO packs (prompt, response) with no rejected side
                k, v = _keys(k_parts, v_parts, *own, prompt, rejected)
                pieces.append(_causal_attention(q_parts[rejected], k, v, scale, keep))
        if sizes[-1]:
            pieces.append(query.new_zeros(heads, sizes[-1], dim))
        outputs.append(torch.cat(pieces, dim=1))
    return torch.stack(outputs).transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, sdpa_mask)  # unpacked calls: SDPA's masks


def use_segment_attention(model: PreTrainedModel) -> None:
    """Switch a model (and its sub-models) to SEGMENT_ATTENTION: packed calls pass `pair_segments`."""
    model.set_attn_implementation(SEGMENT_ATTENTION)


def uses_segment_attention(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == SEGMENT_ATTENTION
