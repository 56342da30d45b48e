"""Per-row sampling: temperature, nucleus (top_p) and greedy rows in one batch, with log-probs.

A row's log-prob is that of the sampled token under the model's distribution at the row's
temperature (temperature 0, greedy, counts as 1), before top_p truncation: the quantity PPO's
ratio uses, so a rollout's log-probs need no second forward pass.
"""

from __future__ import annotations

import torch

NUCLEUS_K = 256
BLOCK = 256


def top_p_mask(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """True where a token falls outside its row's nucleus: the tokens ranked above it already cover
    top_p. The most likely token is always kept."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop_sorted[:, 0] = False
    return torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None = None,
    want_logprobs: bool = False,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next token per row of `logits` [rows, vocab] (bf16 or fp32; the arithmetic is fp32);
    returns (tokens, log-probs or None).

    A sampled row uses exactly one uniform number per step: `uniforms` [rows] when given (the
    engine draws a seeded request's from its own generator), else drawn from `generator`. So a
    row's token depends only on its logits and its own number, not on its neighbours in the batch.
    """
    greedy = temperature == 0
    if bool(greedy.all()):  # eval/tests: skip the softmax and sort entirely
        tokens = logits.argmax(-1)  # the fp32 upcast is exact: same argmax
        logprobs = None
        if want_logprobs:
            logprobs = logits.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        return tokens, logprobs
    # One pass for the fp32 upcast and the temperature (bitwise logits.float() / t).
    scaled = torch.div(logits, torch.where(greedy, 1.0, temperature).float()[:, None])
    logp = scaled.log_softmax(-1)
    u = uniforms if uniforms is not None else torch.rand(len(logp), generator=generator, device=logp.device)
    u = u.to(logp.device, torch.float32)
    nucleus = (top_p < 1) & ~greedy
    full = ~nucleus & ~greedy
    # A batch of one kind (every row top_p < 1, the usual case) skips the row gathers: each
    # boolean index copies the rows' whole [vocab] slices (profiled, 1-2 ms a step at batch 16).
    if bool(nucleus.all()):
        tokens = _sample_nucleus(logp, top_p, u)
    elif bool(full.all()):
        tokens = _race(logp, u)
    else:
        tokens = torch.empty_like(greedy, dtype=torch.long)
        if bool(nucleus.any()):
            tokens[nucleus] = _sample_nucleus(logp[nucleus], top_p[nucleus], u[nucleus])
        if bool(full.any()):
            tokens[full] = _race(logp[full], u[full])
        if bool(greedy.any()):
            tokens[greedy] = logits[greedy].argmax(-1)
    logprobs = logp.gather(1, tokens[:, None]).squeeze(1) if want_logprobs else None
    return tokens, logprobs


def _race(logp: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row from exp(logp) by inverse CDF, in two levels: pick a block of BLOCK tokens
    by the blocks' total mass, then a token inside it. torch.multinomial and the exponential
    race both need one random number per vocabulary entry (exponential_ alone was 30-50 ms a
    step at batch 16 on this CPU, profiled); this needs one per row and a blockwise sum."""
    probs = logp.exp()
    rows, vocab = probs.shape
    if vocab > BLOCK and vocab % BLOCK:
        probs = torch.nn.functional.pad(probs, (0, BLOCK - vocab % BLOCK))
    blocks = probs.view(rows, -1, BLOCK) if vocab > BLOCK else probs.view(rows, 1, vocab)
    cdf = blocks.sum(-1).cumsum(-1)
    u = uniforms[:, None].to(probs.dtype) * cdf[:, -1:]
    block = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    inner = blocks[torch.arange(rows, device=probs.device), block[:, 0]]
    inner_cdf = inner.cumsum(-1)
    j = torch.searchsorted(inner_cdf, u - before, right=True)
    # Rounding can leave u - before at or past the block's own total: take its likeliest token.
    j = torch.where(j[:, 0] >= inner.shape[1], inner.argmax(-1), j[:, 0].clamp(max=inner.shape[1] - 1))
    return block[:, 0] * blocks.shape[2] + j


def _sample_nucleus(logp: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw from each row's nucleus. Sorting the whole vocabulary was a quarter of a decode step
    (profiled), so look at the top `NUCLEUS_K` tokens first: when they already cover top_p the
    nucleus lies inside them and sampling there is exact; other rows take the full sort."""
    k = min(NUCLEUS_K, logp.shape[-1])
    top_logp, top_ids = logp.topk(k, dim=-1)  # sorted, descending
    probs = top_logp.exp()
    covered = probs.sum(-1) >= top_p
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    choice = _race(top_logp.masked_fill(drop, float("-inf")), uniforms)
    tokens = top_ids.gather(1, choice[:, None]).squeeze(1)
    if not bool(covered.all()):
        # the top-k draw of these rows is discarded unseen, so their number is still a fresh draw
        rest = ~covered
        rows = logp[rest]
        tokens[rest] = _race(rows.masked_fill(top_p_mask(rows, top_p[rest]), float("-inf")), uniforms[rest])
    return tokens
