"""Prompts for generation: read from any prefloop data file, validated, and sampled in shuffled passes.

One reader for every stage that samples a policy (PPO, GRPO/RLOO, annotation push, the serving
loop's regression prompts): a row gives its prompt as `prompt` (text or messages), as the prompt of
a preference pair, or as the user turns of an SFT conversation. `PromptSampler` is the one prompt
order: the local PPO loop and every Ray worker draw the same batches from it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from alignment.data_files import DataError, read_rows
from alignment.messages import Message, checked_messages
from alignment.sft_data import to_conversation, to_prompt_completion

EXAMPLE_PROMPTS = Path(__file__).parent / "data" / "sft_house_style.jsonl"


def as_prompt(value: Any, where: str) -> list[Message]:
    """A prompt is a message list ending in a user (or system) turn; a bare string is one user message."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    messages = checked_messages(value, where, "prompt", roles=None)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt's last message is the assistant's; nothing left to respond to")
    return messages


def load_prompts(path: str | Path) -> list[list[Message]]:
    """Prompts from `prompt` rows, preference pairs (any shape `preference_data` reads) or `messages`.

    A `messages` list that ends in a user (or system) turn is one prompt; one that ends in an
    assistant turn is an SFT conversation (or an Alpaca row), giving a prompt per assistant turn.
    """
    from alignment.preference_data import to_canonical  # preference_data is the heavier reader

    prompts: list[list[Message]] = []
    for where, row in read_rows(Path(path)):
        if "chosen" in row or "rejected" in row:
            prompts.append(to_canonical(row, where)["prompt"])
        elif "prompt" in row:
            prompts.append(as_prompt(row["prompt"], where))
        elif _is_prompt(row.get("messages")):
            prompts.append(as_prompt(row["messages"], where))
        elif "messages" in row or "instruction" in row:
            conversation = to_conversation(row, where)
            prompts.extend(ex["prompt"] for ex in to_prompt_completion([conversation]))
        else:
            raise DataError(
                f"{where}: expected 'prompt' (text or messages), 'chosen'/'rejected' or 'messages' "
                f"(keys: {sorted(row)})"
            )
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _is_prompt(messages: Any) -> bool:
    """A message list still waiting for its response (the last turn is not the assistant's)."""
    return (
        isinstance(messages, list)
        and bool(messages)
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") != "assistant"
    )


class PromptSampler:
    """Batches of prompt indices from shuffled passes over `n_prompts`; a batch may span two passes.

    The same seed gives the same batches in every process, which is how data-parallel workers agree
    on each global batch before taking their share of it; `state`/`load_state` let a resumed run
    continue the exact order.
    """

    def __init__(self, n_prompts: int, batch_size: int, seed: int) -> None:
        if n_prompts < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        self.n_prompts, self.batch_size = n_prompts, batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next_batch(self) -> list[int]:
        while len(self.order) < self.batch_size:
            epoch = list(range(self.n_prompts))
            self.rng.shuffle(epoch)
            self.order += epoch
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return batch

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])
