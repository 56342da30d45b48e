import pytest
import torch

from alignment.devices import cpu_has_native_bf16, plan_device


def test_auto_plan_on_this_machine() -> None:
    plan = plan_device()
    if torch.cuda.is_available():
        assert plan.device.type == "cuda"
    else:
        assert plan.device.type == "cpu"
        assert plan.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def test_forced_dtypes_and_trainer_flags() -> None:
    assert plan_device("fp32", "cpu").trainer_precision() == {"bf16": False, "fp16": False}
    assert plan_device("bf16", "cpu").trainer_precision() == {"bf16": True, "fp16": False}
    assert plan_device("bf16", "cpu").trainer_precision(autocast_bf16=False) == {"bf16": False, "fp16": False}
    assert plan_device("bf16", "cpu").name == "bf16"


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        plan_device("fp16", "cpu")
