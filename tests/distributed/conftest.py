"""One local Ray cluster per test session, and a fault injector for the worker-failure tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import Trainer, TrainerCallback

from alignment.sft import EXAMPLE_DATA


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """2 CPUs like this machine: room for exactly two 1-CPU workers."""
    import ray
    from ray import cloudpickle

    # Test-only callables (the fault injector) are shipped to workers by value: workers cannot import tests.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def sft_rows(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(EXAMPLE_DATA.read_text().splitlines(keepends=True)[:n]))
    return path


class CrashOnce(TrainerCallback):
    """Kills the last worker's process at `step`, once: the marker file survives the restart."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        last_rank = os.environ.get("RANK") == str(int(os.environ.get("WORLD_SIZE", "1")) - 1)
        if state.global_step == self.step and last_rank and not self.marker.exists():
            self.marker.touch()
            os._exit(1)  # no cleanup, no exception: like an OOM kill or a lost node


def crashing(build_trainer: Callable[[Any], Trainer], step: int, marker: Path) -> Callable[[Any], Trainer]:
    def build(config: Any) -> Trainer:
        trainer = build_trainer(config)
        trainer.add_callback(CrashOnce(step, marker))
        return trainer

    return build


def assert_adapters_agree(run_a: Path, run_b: Path) -> None:
    """Both saved adapters load (base named in their config) and give the same logits on a probe."""
    import torch

    from alignment.models import adapter_base_model, load_tokenizer, load_with_adapter

    tokenizer = load_tokenizer(adapter_base_model(run_b))
    ids = tokenizer("Ahoy! The capital of Peru is Lima.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_a = load_with_adapter(None, run_a).eval()(ids).logits
        logits_b = load_with_adapter(None, run_b).eval()(ids).logits
    torch.testing.assert_close(logits_b, logits_a, atol=1e-3, rtol=1e-3)


def assert_loads_trained_adapter(run_dir: Path) -> None:
    """The run's adapter reloads with exactly the saved weights, and training moved them from LoRA's init.

    LoRA starts with B = 0 (the adapter is the identity); a saved adapter whose B matrices are all
    still zero, or a reload that does not reproduce the file, fails here.
    """
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from alignment.models import load_with_adapter

    saved = load_file(str(run_dir / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(load_with_adapter(None, run_dir))
    assert saved.keys() == loaded.keys()
    for key, want in saved.items():
        torch.testing.assert_close(loaded[key], want, atol=0, rtol=0, msg=key)
    lora_b = [w for k, w in saved.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b), "every lora_B is still at its zero init"


def shorter_is_better(prompts: list, responses: list[str]) -> list[float]:
    """A program reward for PPO tests: pickled to the Ray workers with this module."""
    return [-len(response) / 20 for response in responses]
