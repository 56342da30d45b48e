"""Chatting with a model (+ adapter): streamed generation with the model's own chat template."""

from __future__ import annotations

from collections.abc import Iterator
from threading import Thread

import torch
from transformers import PreTrainedTokenizerBase, TextIteratorStreamer

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
    """Yield the reply's text as it is generated (greedy when temperature is 0)."""
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    kwargs = dict(
        **inputs,
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    # generate() blocks; run it beside the consumer so tokens arrive as they are produced.
    thread = Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
