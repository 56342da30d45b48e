"""The server's engine: continuous batching, stop handling, and adapter hot-swap under load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from alignment.devices import plan_device
from alignment.generation import SamplingParams as RowParams
from alignment.generation.sampling import top_p_mask
from serving.generation import CURRENT_ALIAS, Delta, GenerationEngine, SamplingParams, _holdback
from tests.serving.conftest import eventually


def test_top_p_mask_keeps_each_rows_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    drop = top_p_mask(logits, torch.tensor([0.7, 1.0]))
    assert (~drop[0]).tolist() == [True, True, False, False]  # 0.5 + 0.3 covers 0.7
    assert not drop[1].any()


def test_incremental_detokenization_matches_a_full_decode(tiny_model: Path) -> None:
    from alignment.generation import Sequence
    from alignment.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    text = "Grüße aus Köln 🎉 — naïve café, 東京 too."
    seq = Sequence([1], RowParams())
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        seq.tokens.append(token)
        seq.decode_step(tokenizer)
        assert "\ufffd" not in seq.text  # a half-decoded character is never exposed
    seq.decode_step(tokenizer, flush=True)
    assert seq.text == text


def test_a_short_request_joins_and_leaves_while_a_long_one_streams(tiny_model: Path) -> None:
    engine = GenerationEngine(
        str(tiny_model), plan_device("fp32"), served_name="tiny-random", max_batch_size=4, threads=1
    )
    prompt = engine.encode([{"role": "user", "content": "tell me a long story"}])
    long_params = SamplingParams(temperature=0.0, max_tokens=60)
    short_params = SamplingParams(temperature=0.0, max_tokens=4)

    async def scenario() -> None:
        solo_long = (await engine.generate("tiny-random", prompt, long_params)).choices[0]
        solo_short = (await engine.generate("tiny-random", prompt, short_params)).choices[0]
        assert solo_long.completion_tokens > 20  # long enough to still be running below
        order: list[str] = []

        async def run(name: str, params: SamplingParams, started: asyncio.Event | None = None):
            text = ""
            async for event in engine.stream(engine.submit("tiny-random", prompt, params)):
                if isinstance(event, Delta):
                    text += event.text
                    if started is not None and text:
                        started.set()
                else:
                    order.append(name)
                    return event.choices[0], text

        streaming = asyncio.Event()
        long_task = asyncio.create_task(run("long", long_params, streaming))
        await streaming.wait()  # the long answer is mid-way ...
        short, _ = await run("short", short_params)  # ... when the short request arrives
        assert order == ["short"]  # it left while the long one was still decoding
        long, streamed = await long_task
        assert order == ["short", "long"]
        assert (short.text, short.finish_reason) == (solo_short.text, solo_short.finish_reason)
        assert (long.text, long.completion_tokens) == (solo_long.text, solo_long.completion_tokens)
        assert streamed == long.text

    try:
        asyncio.run(scenario())
    finally:
        engine.close()


def test_holdback_keeps_possible_stop_prefixes_unsent() -> None:
    assert _holdback("hello wor", ("world",)) == 3
    assert _holdback("hello", ("world",)) == 0
    assert _holdback("ab", ("bc", "abx")) == 2


def test_hot_swap_under_load_fails_no_request_and_unloads_the_old_adapter(tiny_model: Path, adapters) -> None:
    # fp32: answers are compared across batch compositions, where bf16 rounding could flip a near-tie.
    engine = GenerationEngine(
        str(tiny_model),
        plan_device("fp32"),
        served_name="tiny-random",
        max_batch_size=8,
        max_wait_ms=2,
        threads=1,
    )
    prompt = engine.encode([{"role": "user", "content": "hi"}])
    params = SamplingParams(temperature=0.0, max_tokens=6)

    async def scenario() -> list[str]:
        expected = {}
        for name in ("a1", "a2"):
            engine.load_adapter(name, adapters[name])  # pinned: stays loaded through the swaps below
            expected[name] = (await engine.generate(name, prompt, params)).choices[0].text
        assert expected["a1"] != expected["a2"]
        expected["tiny-random"] = (await engine.generate("tiny-random", prompt, params)).choices[0].text
        requests = []
        for i in range(6):  # a wave of requests, then a swap while they are still queued or running
            requests += [
                asyncio.create_task(engine.generate(CURRENT_ALIAS, prompt, params)) for _ in range(6)
            ]
            await asyncio.sleep(0)  # let the wave be admitted
            version = ("v1", "v2")[i % 2]  # unpinned: each swap retires (and unloads) the other one
            await asyncio.to_thread(engine.swap, CURRENT_ALIAS, version, adapters[("a1", "a2")[i % 2]])
        results = await asyncio.gather(*requests)  # raises if any request failed
        answers = {"v1": expected["a1"], "v2": expected["a2"], "tiny-random": expected["tiny-random"]}
        for r in results:  # whichever version answered, the answer is that version's answer
            assert r.choices[0].text == answers[r.model_version]
        return [r.model_version for r in results]

    try:
        versions = asyncio.run(scenario())
        assert set(versions) == {"tiny-random", "v1", "v2"}
        assert versions[:6] == ["tiny-random"] * 6  # admitted before the first swap
        # v1 is unloaded once its last request is done (asynchronously, by the generation thread).
        assert eventually(lambda: "v1" not in engine.adapters)
        assert {"a1", "a2", "v2"} <= set(engine.adapters)
        engine.swap(CURRENT_ALIAS, None)
        assert eventually(lambda: "v2" not in engine.adapters) and "v2" not in engine.model_names()
    finally:
        engine.close()


def test_the_serve_config_sets_how_many_merged_adapter_copies_the_engine_keeps(tiny_model: Path) -> None:
    import pydantic

    from serving.config import BatchingSettings

    with pytest.raises(pydantic.ValidationError, match="merged_copies"):
        BatchingSettings(merged_copies=-1)
    engine = GenerationEngine(
        str(tiny_model), plan_device("fp32"), served_name="tiny-random", threads=1, merged_copies=0
    )
    assert engine.engine.merged_copies == 0
