"""LoRA as one addmm (`alignment.lora_addmm`, used by DPO): the same outputs and gradients as PEFT's forward."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from alignment.lora_addmm import use_addmm_lora


def lora_model(tiny_model: Path, dtype: torch.dtype, dropout: float = 0.0) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    from alignment.models import load_causal_lm

    torch.manual_seed(0)
    base = load_causal_lm(tiny_model).to(dtype)
    # init_lora_weights=False: B is random too, so the LoRA term is not zero
    config = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False
    )
    return get_peft_model(base, config).to(dtype)


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_addmm_lora_matches_peft_forward_and_backward(tiny_model: Path) -> None:
    """fp32: equal to rounding. bf16: no further from the fp32 numbers than PEFT's own bf16 forward."""
    torch.set_num_threads(1)
    ids = torch.randint(0, 1000, (2, 24))
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        peft_model = lora_model(tiny_model, dtype)
        ours = copy.deepcopy(peft_model)
        assert use_addmm_lora(ours) > 0
        results[dtype] = loss_and_grads(ours, ids), loss_and_grads(peft_model, ids)
    (loss, grads), (ref_loss, ref_grads) = results[torch.float32]
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5 * grad.abs().max().item(), rtol=1e-4)

    # bf16 gradients of a random model are noisy element by element: compare whole-model errors
    def error(found: dict[str, torch.Tensor]) -> float:
        diff = torch.cat([(found[n] - ref_grads[n]).flatten() for n in ref_grads])
        return (diff.norm() / torch.cat([g.flatten() for g in ref_grads.values()]).norm()).item()

    (bf16_loss, bf16_grads), (peft_loss, peft_grads) = results[torch.bfloat16]
    assert abs(bf16_loss - ref_loss) <= 2 * abs(peft_loss - ref_loss) + 1e-3
    assert error(bf16_grads) <= 1.5 * error(peft_grads), (error(bf16_grads), error(peft_grads))


def test_addmm_lora_leaves_other_cases_to_peft(tiny_model: Path) -> None:
    """Disabled adapters (the DPO reference) and LoRA dropout run PEFT's own forward."""
    torch.set_num_threads(1)
    ids = torch.randint(0, 1000, (1, 12))
    model = lora_model(tiny_model, torch.float32)
    use_addmm_lora(model)
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
        base = model.get_base_model()
        for module in base.modules():  # the base alone, LoRA layers bypassed
            if hasattr(module, "_peft_forward"):
                module.forward = module.base_layer.forward
        torch.testing.assert_close(disabled, base(input_ids=ids).logits)

    dropped = lora_model(tiny_model, torch.float32, dropout=0.5)
    use_addmm_lora(dropped)
    dropped.train()
    calls = []
    layer = next(m for m in dropped.modules() if hasattr(m, "_peft_forward"))
    original = layer._peft_forward
    layer._peft_forward = lambda x, *a, **k: calls.append(1) or original(x, *a, **k)
    dropped(input_ids=ids)
    assert calls  # dropout on the LoRA input: PEFT's forward, not addmm
