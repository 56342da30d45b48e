"""One policy loader for DPO, KTO, PPO, GRPO and push: adapter, quantization and tokenizer rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from alignment.devices import plan_device
from alignment.kto import KTORunConfig
from alignment.models import load_causal_lm, load_tokenizer
from alignment.policy import load_policy, load_policy_tokenizer, load_run_policy, load_run_tokenizer

CUSTOM_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def sft_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SFT-run-like adapter directory: LoRA weights plus the (edited) tokenizer the run used."""
    out = tmp_path_factory.mktemp("sft-adapter")
    torch.manual_seed(0)
    model = get_peft_model(
        load_causal_lm(tiny_model, plan_device("fp32")), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(out)
    tokenizer = load_tokenizer(tiny_model)
    tokenizer.chat_template = CUSTOM_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_init_adapter_is_trainable_and_quantization_is_honoured(tiny_model: Path, sft_adapter: Path) -> None:
    config = KTORunConfig(model=str(tiny_model), init_adapter=sft_adapter, lora={"quantization": "4bit"})
    model, peft_config = load_run_policy(config, plan_device("fp32"))
    assert peft_config is None  # TRL then takes the adapter as the policy and its frozen copy as "ref"
    assert isinstance(model, PeftModel)
    assert model.get_base_model().is_loaded_in_4bit  # the drift this loader removes: skipped before
    names = trainable_names(model)
    assert names and all("lora_" in n for n in names)


def test_without_init_adapter_a_fresh_lora_is_returned_or_added(tiny_model: Path) -> None:
    config = KTORunConfig(model=str(tiny_model), lora={"r": 2, "target_modules": ["q_proj"]})
    model, peft_config = load_run_policy(config, plan_device("fp32"))
    assert not isinstance(model, PeftModel) and peft_config.r == 2
    assert not getattr(model, "is_loaded_in_4bit", False)
    wrapped, none = load_run_policy(config, plan_device("fp32"), wrap_lora=True)
    assert none is None and isinstance(wrapped, PeftModel)
    assert trainable_names(wrapped) and all("q_proj.lora_" in n for n in trainable_names(wrapped))


def test_a_sampling_policy_keeps_its_adapter_frozen(tiny_model: Path, sft_adapter: Path) -> None:
    model, peft_config = load_policy(str(tiny_model), sft_adapter, plan_device("fp32"))
    assert peft_config is None and isinstance(model, PeftModel)
    assert trainable_names(model) == []
    trained, _ = load_policy(str(tiny_model), sft_adapter, plan_device("fp32"), trainable=True)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(ids).logits, trained(ids).logits)  # same weights, only trainability


def test_the_adapters_own_tokenizer_wins_over_the_bases(
    tiny_model: Path, sft_adapter: Path, tmp_path: Path
) -> None:
    assert load_policy_tokenizer(str(tiny_model), sft_adapter).chat_template == CUSTOM_TEMPLATE
    config = KTORunConfig(model=str(tiny_model), init_adapter=sft_adapter)
    assert load_run_tokenizer(config).chat_template == CUSTOM_TEMPLATE
    # An adapter saved without a tokenizer: the base's (with its ChatML default).
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / f).write_bytes((sft_adapter / f).read_bytes())
    assert (
        load_policy_tokenizer(str(tiny_model), bare).chat_template == load_tokenizer(tiny_model).chat_template
    )
    assert load_policy_tokenizer(str(tiny_model)).chat_template != CUSTOM_TEMPLATE
