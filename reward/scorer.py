"""Score (prompt, response) pairs with a trained reward model, fast.

    scorer = RewardScorer.from_pretrained("runs/reward")
    scorer(["What is 2+2?"], ["Ahoy! 4. Fair winds!"])   # -> [1.73]

Texts are rendered with the same chat template the reward trainer used, sorted by length so each
batch pads as little as possible, and run in bf16 where the hardware has it. A scorer is a plain
`(prompts, responses) -> rewards` callable, which is what PPO/GRPO and the serving loop take.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from alignment.devices import DevicePlan, plan_device
from alignment.models import ModelError, load_causal_lm, load_tokenizer

Prompt = str | list[dict[str, str]]


def conversation(prompt: Prompt, response: str) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*messages, {"role": "assistant", "content": response}]


def base_model_of(path: Path) -> str | None:
    """The base model a LoRA adapter directory was trained on; None for a full model."""
    adapter_config = path / "adapter_config.json"
    return (
        json.loads(adapter_config.read_text())["base_model_name_or_path"]
        if adapter_config.is_file()
        else None
    )


def load_reward_model(path: str | Path, plan: DevicePlan | None = None) -> torch.nn.Module:
    """A reward LoRA adapter (merged into its base for speed) or a full sequence-classification model."""
    plan = plan or plan_device()
    path = Path(path)
    if (base_name := base_model_of(path)) is not None:
        from peft import PeftModel

        base = load_causal_lm(base_name, plan, model_cls=AutoModelForSequenceClassification, num_labels=1)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    else:
        model = load_causal_lm(path, plan, model_cls=AutoModelForSequenceClassification, num_labels=1)
    if model.config.num_labels != 1:
        raise ModelError(f"{path}: a reward model has one output, this one has {model.config.num_labels}")
    return model.eval()


class RewardScorer:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 16,
        max_length: int = 2048,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        # The sequence-classification head reads the reward at the last non-pad token.
        model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(
        cls, path: str | Path, plan: DevicePlan | None = None, batch_size: int = 16, max_length: int = 2048
    ) -> RewardScorer:
        path = Path(path)
        tokenizer = load_tokenizer(base_model_of(path) or path)
        return cls(load_reward_model(path, plan), tokenizer, batch_size, max_length)

    def tokenize(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[list[int]]:
        """Token ids as the reward trainer saw them; over-long inputs keep their end, where the reward is read."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [
            self.tokenizer.apply_chat_template(conversation(p, r), tokenize=False)
            for p, r in zip(prompts, responses, strict=True)
        ]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [seq[-self.max_length :] for seq in ids]

    @torch.inference_mode()
    def score_ids(self, ids: list[list[int]]) -> list[float]:
        device = next(self.model.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        rewards = [0.0] * len(ids)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(ids[batch[0]])  # longest first, so the first of a batch sets its width
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                attention_mask[row, : len(ids[i])] = 1
            logits = self.model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits
            for row, i in enumerate(batch):
                rewards[i] = float(logits[row, 0])
        return rewards

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return self.score_ids(self.tokenize(prompts, responses))

    __call__ = score
