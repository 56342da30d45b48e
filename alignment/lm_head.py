"""log p(token) of the scored positions of a causal LM, without the (tokens x vocab) logits whole.

    log_probs, entropy, mean_logits, is_top1 = completion_log_probs(hidden, model.lm_head.weight, targets)

DPO (`alignment.dpo`) and PPO/GRPO (`alignment.rl.models`) score only completion tokens: their final
hidden states go through the LM head a chunk at a time, and the backward rebuilds each chunk's logits.
"""

from __future__ import annotations

from typing import Any

import torch

LM_HEAD_CHUNK = 256  # scored positions per LM-head chunk: (256, V) logits at a time, never (N, V)


class _ChunkLogZ(torch.autograd.Function):
    """log Z = logsumexp(hidden @ weight^T) of a chunk of scored positions, plus TRL's logged statistics.

    Saves only `hidden` and log Z; the backward rebuilds the chunk's logits once for the softmax
    (d log Z / d z = softmax(z)). Checkpointing the plain autograd version instead re-ran the whole
    forward in the backward, statistics included: ~10 full passes over (chunk, V) fp32 logits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        z = (hidden @ weight.t()).float()  # (n, V): the one big matmul, in the weights' dtype
        mean_logits = z.mean(-1)
        is_top1 = z.argmax(-1) == targets
        peak = z.amax(-1, keepdim=True)
        e = torch.exp(z - peak)
        total = e.sum(-1)
        log_z = peak.squeeze(-1) + total.log()
        entropy = log_z - torch.linalg.vecdot(e, z) / total  # log Z - E_p[z]
        ctx.save_for_backward(hidden, weight, log_z)
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1)
        return log_z, entropy, mean_logits, is_top1

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_log_z: torch.Tensor, *_: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        hidden, weight, log_z = ctx.saved_tensors
        z = (hidden @ weight.t()).float()
        grad_z = z.sub_(log_z.unsqueeze(-1)).exp_().mul_(grad_log_z.unsqueeze(-1)).to(hidden.dtype)
        grad_hidden = grad_z @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_z.t() @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None


def completion_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = LM_HEAD_CHUNK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(target) for N scored positions, plus TRL's logged statistics (entropy, mean logit, top-1).

    hidden: (N, H) final hidden states; weight: (V, H) LM head; targets: (N,) next-token ids.
    The logits are built `chunk` rows at a time and rebuilt in the backward (`_ChunkLogZ`): the fp32
    (N, V) logits and their gradient, the largest tensors of a long-pair DPO step, never exist whole.
    """
    parts = [
        _ChunkLogZ.apply(h, weight, t) for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True)
    ]
    log_z, entropy, mean_logits, is_top1 = (torch.cat(p) for p in zip(*parts, strict=True))
    # The target's logit again, in fp32 from its own row of the head: N*H work, no bf16 rounding.
    target_logits = (hidden.float() * weight[targets].float()).sum(-1)
    return target_logits - log_z, entropy, mean_logits, is_top1
