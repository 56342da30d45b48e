"""Packed pairs (prompt once, chosen and rejected in one row) give the same rewards and gradients as full sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trl.trainer.reward_trainer import DataCollatorForPreference

from reward.trainer import PackedPairCollator, add_packed_pair_scoring


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_pairs_match_full_sequences(tiny_model: Path, attention: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from alignment.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, dtype=torch.float32, attn_implementation=attention
    )
    base.config.pad_token_id = tokenizer.pad_token_id
    add_packed_pair_scoring(base)
    lora = LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS", init_lora_weights=False)
    model = get_peft_model(base, lora)

    def ids(prompt: str, response: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]

    examples = [  # prompts of different lengths, responses of different lengths
        {"chosen_ids": ids("Hi", "red blue ahoy"), "rejected_ids": ids("Hi", "no")},
        {
            "chosen_ids": ids("A much longer prompt here", "ok"),
            "rejected_ids": ids("A much longer prompt here", "warm cold sad"),
        },
        {"chosen_ids": ids("Q", "x"), "rejected_ids": ids("Q", "x y")},
    ]

    full = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    expected = model(**full).logits.squeeze(-1)
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    packed = PackedPairCollator(tokenizer.pad_token_id)(examples)
    assert packed["input_ids"].numel() < full["input_ids"].numel()  # the point: fewer tokens
    got = model(**packed).logits.squeeze(-1)
    got.sum().backward()

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected_grads[name], atol=1e-5, rtol=1e-3, msg=name)
