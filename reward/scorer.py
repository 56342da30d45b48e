"""Score (prompt, response) pairs with a trained reward model, fast.

    scorer = RewardScorer.from_pretrained("runs/reward")
    scorer(["What is 2+2?"], ["Ahoy! 4. Fair winds!"])   # -> [1.73]

    chosen, rejected = scorer.score_pairs(prompts, chosen_texts, rejected_texts)   # a pair per packed row

Texts are rendered with the same chat template the reward trainer used, sorted by length so each
batch pads as little as possible, and run in bf16 where the hardware has it. A scorer is a plain
`(prompts, responses) -> rewards` callable, which is what PPO/GRPO and the serving loop take.
`score_pairs` runs a pair's shared prompt once: [prompt | chosen | rejected] in one row under the
mask of `alignment.shared_prompt` (rejected never sees chosen), the reward read at each side's last
token, exactly as the reward trainer computes it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from alignment.devices import DevicePlan, plan_device
from alignment.models import ModelError, check_adapter, load_causal_lm, load_tokenizer
from alignment.quiet import new_head_expected
from alignment.shared_prompt import PackedPairs, pack_pairs, use_segment_attention
from alignment.trl_compat import common_prefix_length

Prompt = str | list[dict[str, str]]


def conversation(prompt: Prompt, response: str) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*messages, {"role": "assistant", "content": response}]


def shared_length(chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Tokens the two sides share up front, keeping at least one of its own per side (the score is read there)."""
    return min(common_prefix_length(list(chosen), list(rejected)), len(chosen) - 1, len(rejected) - 1)


def split_pair(chosen: Sequence[int], rejected: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """(shared prompt, chosen rest, rejected rest) token tensors of one pair."""
    n = shared_length(chosen, rejected)
    return torch.tensor(chosen[:n]), torch.tensor(chosen[n:]), torch.tensor(rejected[n:])


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packed_pair_scores(model: torch.nn.Module, packed: PackedPairs) -> torch.Tensor:
    """(2B, 1) rewards of packed pairs, chosen half then rejected half: the score head at each side's
    last token. `model` is a sequence-classification model (PEFT-wrapped or not)."""
    inner = unwrapped(model)
    transformer = inner.base_model
    device = transformer.get_input_embeddings().weight.device
    hidden = transformer(
        input_ids=packed.input_ids.to(device),
        position_ids=packed.position_ids.to(device),
        pair_segments=packed.segments,  # needs `use_segment_attention(model)`
        use_cache=False,
    ).last_hidden_state
    return inner.score(hidden.reshape(-1, hidden.shape[-1])[packed.last_token_index().to(device)])


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

        with new_head_expected():  # a causal LM base: the adapter below restores the trained head
            base = load_causal_lm(base_name, plan, model_cls=AutoModelForSequenceClassification, num_labels=1)
        model = PeftModel.from_pretrained(base, check_adapter(path)).merge_and_unload()
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
        use_segment_attention(unwrapped(model))  # packed pairs attend per sequence; others get SDPA

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

    @torch.inference_mode()
    def score_pair_ids(
        self, chosen: list[list[int]], rejected: list[list[int]]
    ) -> tuple[list[float], list[float]]:
        """Rewards of (chosen, rejected) token-id pairs, one packed row a pair, longest batches first."""
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected")
        parts = [split_pair(c, r) for c, r in zip(chosen, rejected, strict=True)]
        order = sorted(range(len(parts)), key=lambda i: -sum(len(t) for t in parts[i]))
        chosen_rewards, rejected_rewards = [0.0] * len(parts), [0.0] * len(parts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            packed = pack_pairs(
                *([parts[i][k] for i in batch] for k in range(3)),
                pad_id=self.tokenizer.pad_token_id,
                across_pairs=False,
            )
            scores = packed_pair_scores(self.model, packed).float().squeeze(-1).tolist()
            for row, i in enumerate(batch):
                chosen_rewards[i], rejected_rewards[i] = scores[row], scores[len(batch) + row]
        return chosen_rewards, rejected_rewards

    def score_pairs(
        self, prompts: Sequence[Prompt], chosen: Sequence[str], rejected: Sequence[str]
    ) -> tuple[list[float], list[float]]:
        """Rewards of each prompt's chosen and rejected response; the prompt runs once per pair."""
        if not (len(prompts) == len(chosen) == len(rejected)):
            raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
        return self.score_pair_ids(self.tokenize(prompts, chosen), self.tokenize(prompts, rejected))

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return self.score_ids(self.tokenize(prompts, responses))

    __call__ = score
