"""fp32 master weights: updates below bf16 resolution accumulate, and resumed optimizer state moves along."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from alignment.lora_precision import FP32MasterWeights, cast_adapter_params


def steps(
    param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, callback: FP32MasterWeights | None, n: int
) -> None:
    for _ in range(n):
        param.grad = torch.ones_like(param)
        if callback:
            callback.on_pre_optimizer_step(None, None, None)
        optimizer.step()
        if callback:
            callback.on_optimizer_step(None, None, None)
        param.grad = None


def test_small_updates_accumulate_in_the_masters_and_round_away_without_them() -> None:
    # bf16 spacing at 1.0 is 2**-7: a step of 1e-3 rounds back to 1.0 on a bf16 weight.
    pure = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    steps(pure, torch.optim.SGD([pure], lr=1e-3), None, 20)
    assert torch.equal(pure, torch.ones_like(pure))

    param = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = torch.optim.SGD([param], lr=1e-3)
    callback = FP32MasterWeights()
    callback.on_train_begin(None, None, None, optimizer=optimizer)
    steps(param, optimizer, callback, 20)
    ((_, master),) = callback.pairs
    torch.testing.assert_close(master, torch.full((4,), 0.98), atol=1e-6, rtol=0)
    assert param.dtype == torch.bfloat16 and torch.equal(param, master.to(torch.bfloat16))
    assert param[0].item() < 1.0


def test_state_restored_from_a_checkpoint_moves_to_the_fp32_master() -> None:
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    optimizer = torch.optim.AdamW([param], lr=1e-2)
    steps(param, optimizer, None, 1)  # as after load_state_dict: moments in the parameter's bf16
    assert optimizer.state[param]["exp_avg"].dtype == torch.bfloat16
    callback = FP32MasterWeights()
    callback.on_train_begin(
        None,
        None,
        None,
        optimizer=SimpleNamespace(param_groups=optimizer.param_groups, state=optimizer.state),
    )
    ((_, master),) = callback.pairs
    assert param not in optimizer.state
    assert optimizer.state[master]["exp_avg"].dtype == torch.float32
    steps(param, optimizer, callback, 1)
    assert optimizer.state[master]["step"].item() == 2


def test_cast_adapter_params_leaves_other_dtypes() -> None:
    model = torch.nn.Module()
    model.base = torch.nn.Linear(2, 2).to(torch.bfloat16)  # the frozen base, already bf16
    model.lora = torch.nn.Linear(2, 2)  # fp32, like a fresh LoRA matrix
    model.fp16 = torch.nn.Linear(2, 2).to(torch.float16)  # neither fp32 nor the target: untouched
    model.fp64 = torch.nn.Linear(2, 2).to(torch.float64)
    before = model.fp64.weight.detach().clone()
    cast_adapter_params(model, torch.bfloat16)
    assert {p.dtype for p in model.base.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.lora.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.fp16.parameters()} == {torch.float16}
    assert {p.dtype for p in model.fp64.parameters()} == {torch.float64}
    assert torch.equal(model.fp64.weight, before)
