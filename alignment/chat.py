"""Chatting with a model (+ adapter): streamed generation with the model's own chat template."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import PreTrainedTokenizerBase

from alignment.generation import SamplingParams, policy_engine
from alignment.sft_data import Message


@torch.inference_mode()
def stream_reply(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Iterator[str]:
    """Yield the reply's text as it is generated (greedy when temperature is 0), by the
    generation engine: each decode step's new text as soon as it is whole."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    engine = policy_engine(model, tokenizer, max_batch_size=1)
    seq = engine.add(prompt_ids, SamplingParams(temperature, top_p, max_new_tokens), engine.merged)
    sent = 0
    while not seq.done:
        engine.step()
        if len(seq.text) > sent:
            yield seq.text[sent:]
            sent = len(seq.text)
