"""Token ids for PPO: chat-templated prompts, PPO-ptx examples, and padding into batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from alignment.messages import Message
from alignment.sft_data import load_conversations, to_prompt_completion


def tokenize_prompts(
    prompts: Sequence[list[Message]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[list[Message]], list[list[int]], int]:
    """Chat-template each prompt with the generation prompt; drop (and count) those over max_length."""
    kept, ids, dropped = [], [], 0
    for prompt in prompts:
        encoded = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        if len(encoded) > max_length:
            dropped += 1
            continue
        kept.append(prompt)
        ids.append(encoded)
    return kept, ids, dropped


def tokenize_ptx(
    path: Path, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """SFT conversations -> (input_ids, labels) with the prompt masked (-100): log pi(x) on responses only."""
    examples = []
    for ex in to_prompt_completion(load_conversations(path)):
        prompt_ids = _ids(
            tokenizer.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True)
        )
        full_ids = _ids(tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True))
        labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
        examples.append((full_ids[:max_length], labels[:max_length]))
    return examples


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def pad(sequences: Sequence[Sequence[int]], value: int, side: Literal["left", "right"]) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    rows = [
        ([value] * (width - len(s)) + list(s)) if side == "left" else (list(s) + [value] * (width - len(s)))
        for s in sequences
    ]
    return torch.tensor(rows, dtype=torch.long)
