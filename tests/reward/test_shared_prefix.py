"""Packed pairs (prompt once, chosen and rejected in one row) give the same rewards and gradients as full sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trl.trainer.reward_trainer import DataCollatorForPreference

from alignment.shared_prompt import use_segment_attention
from reward.scorer import RewardScorer
from reward.trainer import PackedPairCollator, add_packed_pair_scoring

SYSTEM = {"role": "system", "content": "You answer like a pirate."}
MULTI_TURN = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris, matey."},
    {"role": "user", "content": "And of Spain?"},
]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])  # the full sequences' attention
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

    def ids(prompt: str | list[dict[str, str]], response: str) -> list[int]:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        messages = [*turns, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]

    examples = [  # prompts of different lengths, responses of different lengths
        {"chosen_ids": ids("Hi", "red blue ahoy"), "rejected_ids": ids("Hi", "no")},
        {
            "chosen_ids": ids("A much longer prompt here", "ok"),
            "rejected_ids": ids("A much longer prompt here", "warm cold sad"),
        },
        {"chosen_ids": ids("Q", "x"), "rejected_ids": ids("Q", "x y")},
        {"chosen_ids": ids(MULTI_TURN, "Madrid."), "rejected_ids": ids(MULTI_TURN, "Lisbon, arr.")},
        {
            "chosen_ids": ids([SYSTEM, *MULTI_TURN], "Madrid."),
            "rejected_ids": ids([SYSTEM, *MULTI_TURN], "I do not know"),
        },
    ]

    full = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    expected = model(**full).logits.squeeze(-1)
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    use_segment_attention(base)  # packed rows attend per sequence
    packed = PackedPairCollator(tokenizer.pad_token_id)(examples)
    assert packed["input_ids"].numel() < full["input_ids"].numel()  # the point: fewer tokens
    got = model(**packed).logits.squeeze(-1)
    got.sum().backward()

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected_grads[name], atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])  # the separate sequences' attention
def test_scorer_pairs_in_one_row_match_separate_sequences(tiny_model: Path, attention: str) -> None:
    from transformers import AutoModelForSequenceClassification

    from alignment.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, dtype=torch.float32, attn_implementation=attention
    ).eval()
    prompts = ["Hi", MULTI_TURN, [SYSTEM, *MULTI_TURN], [SYSTEM, {"role": "user", "content": "Q"}]]
    chosen = ["red blue ahoy", "Madrid.", "Madrid, matey.", "x"]
    rejected = ["no", "Lisbon, I think, but I am not sure at all", "?", "x y z"]
    separate = RewardScorer(model, tokenizer, batch_size=4)
    expected = separate.score(prompts + prompts, chosen + rejected)  # before the switch: eager or SDPA
    scorer = RewardScorer(model, tokenizer, batch_size=3)  # switches to segment attention
    got_chosen, got_rejected = scorer.score_pairs(prompts, chosen, rejected)
    torch.testing.assert_close(
        torch.tensor(got_chosen + got_rejected), torch.tensor(expected), atol=1e-5, rtol=1e-4
    )
