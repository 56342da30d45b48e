"""log p(token) of the scored positions of a causal LM, without the (tokens x vocab) logits whole.

    log_probs, entropy, mean_logits, is_top1 = completion_log_probs(hidden, model.lm_head.weight, targets)

DPO (`alignment.dpo`) and PPO/GRPO (`alignment.rl.models`) score only completion tokens: their final
hidden states go through the LM head a chunk at a time, and the (tokens x vocab) fp32 logits never
exist whole; the backward reuses each chunk's softmax, kept in bf16.
"""

from __future__ import annotations

from typing import Any

import torch

# Scored positions per LM-head chunk: (128, V) fp32 logits at a time, never (N, V). At 128 a chunk's
# fp32 temporaries (25 MB for SmolLM2's 49k vocabulary) stay below glibc's 32 MiB mmap ceiling
# (`alignment.devices.keep_freed_cpu_memory`), so they are reused, not faulted in anew each chunk
# (measured no slower than 256 at 118-1024 scored positions).
LM_HEAD_CHUNK = 128
# Keep each chunk's softmax in bf16 for the backward while all of them fit in this many bytes; above
# it, rebuild the logits in the backward instead. Keeping them measured 20-35% faster on SmolLM2's head
# (N = 118 and 512 scored tokens, one thread): one (N, V) matmul and three (N, V) passes fewer.
KEEP_SOFTMAX_BYTES = 512 * 2**20


class _ChunkLogZ(torch.autograd.Function):
    """log Z = logsumexp(hidden @ weight^T) of a chunk of scored positions, plus TRL's logged statistics.

    Saves the chunk's softmax (d log Z / d z) in the weights' dtype, or with `rebuild` only `hidden`
    and log Z, the backward then rebuilding the logits once. Checkpointing the plain autograd version
    instead re-ran the whole forward in the backward, statistics included: ~10 full passes over
    (chunk, V) fp32 logits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rebuild: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        z = (hidden @ weight.t()).float()  # (n, V): the one big matmul, in the weights' dtype
        peak = z.amax(-1, keepdim=True)
        probs = (z - peak).exp_()
        total = probs.sum(-1, keepdim=True)
        log_z = (peak + total.log()).squeeze(-1)
        probs /= total
        entropy = log_z - torch.linalg.vecdot(probs, z)  # log Z - E_p[z]
        mean_logits = z.mean(-1)
        is_top1 = z.gather(-1, targets[:, None]) >= peak  # the target is (one of) the most likely
        ctx.rebuild = rebuild
        if rebuild:
            ctx.save_for_backward(hidden, weight, log_z)
        else:
            ctx.save_for_backward(hidden if ctx.needs_input_grad[1] else None, weight, probs.to(hidden.dtype))
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1)
        return log_z, entropy, mean_logits, is_top1.squeeze(-1)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_log_z: torch.Tensor, *_: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        hidden, weight, saved = ctx.saved_tensors
        if ctx.rebuild:
            z = (hidden @ weight.t()).float()
            grad_z = z.sub_(saved.unsqueeze(-1)).exp_().mul_(grad_log_z.unsqueeze(-1)).to(weight.dtype)
        else:
            grad_z = saved.mul_(grad_log_z.unsqueeze(-1).to(saved.dtype))
        grad_hidden = grad_z @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_z.t() @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def completion_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = LM_HEAD_CHUNK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(target) for N scored positions, plus TRL's logged statistics (entropy, mean logit, top-1).

    hidden: (N, H) final hidden states; weight: (V, H) LM head; targets: (N,) next-token ids.
    The logits are built `chunk` rows at a time (`_ChunkLogZ`): the fp32 (N, V) logits, the largest
    tensor of a long-pair DPO step, never exist whole; the backward uses each chunk's saved bf16
    softmax while all of them fit in KEEP_SOFTMAX_BYTES, else rebuilds it.
    """
    rebuild = hidden.shape[0] * weight.shape[0] * weight.element_size() > KEEP_SOFTMAX_BYTES
    parts = [
        _ChunkLogZ.apply(h, weight, t, rebuild)
        for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True)
    ]
    log_z, entropy, mean_logits, is_top1 = (torch.cat(p) for p in zip(*parts, strict=True))
    # The target's logit again, in fp32 from its own row of the head: N*H work, no bf16 rounding.
    target_logits = (hidden.float() * weight[targets].float()).sum(-1)
    return target_logits - log_z, entropy, mean_logits, is_top1
