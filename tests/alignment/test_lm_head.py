"""The completion-only LM head (alignment.lm_head) equals log_softmax over the full logits."""

from __future__ import annotations

import pytest
import torch

from alignment import lm_head
from alignment.lm_head import completion_log_probs


def test_completion_log_probs_match_log_softmax() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (6,))
    log_probs, entropy, mean_logits, is_top1 = completion_log_probs(hidden, weight, targets)
    logits = hidden @ weight.t()
    expected = torch.log_softmax(logits, -1)
    torch.testing.assert_close(log_probs, expected.gather(-1, targets[:, None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(expected.exp() * expected).sum(-1))
    torch.testing.assert_close(mean_logits, logits.mean(-1))
    assert torch.equal(is_top1, logits.argmax(-1) == targets)


@pytest.mark.parametrize("rebuild", [False, True])  # saved bf16 softmax / logits rebuilt per chunk
def test_completion_log_probs_gradients_match_log_softmax(
    rebuild: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunked head's own backward gives autograd's log_softmax gradients."""
    monkeypatch.setattr(lm_head, "KEEP_SOFTMAX_BYTES", 0 if rebuild else 2**30)
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets, upstream = torch.randint(0, 50, (7,)), torch.randn(7)
    (completion_log_probs(hidden, weight, targets, chunk=3)[0] * upstream).sum().backward()
    ours = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    expected = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(ours[0], hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[1], weight.grad, atol=1e-5, rtol=1e-4)


def test_saved_bf16_softmax_gives_the_rebuilt_gradients_within_bf16_rounding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(9, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(300, 32, dtype=torch.bfloat16)
    targets, upstream = torch.randint(0, 300, (9,)), torch.randn(9)
    grads = []
    for budget in (2**30, 0):  # keep the softmax, then rebuild it
        monkeypatch.setattr(lm_head, "KEEP_SOFTMAX_BYTES", budget)
        (completion_log_probs(hidden, weight, targets, chunk=4)[0].float() * upstream).sum().backward()
        grads.append(hidden.grad.float())
        hidden.grad = None
    torch.testing.assert_close(grads[0], grads[1], atol=2e-2, rtol=2e-2)
    assert grads[0].abs().max() > 0.1  # a real gradient, not two zeros
