"""The generation engine: per-row sampling, stop handling, and adapter hot-swap under load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from alignment.devices import plan_device
from serving.generation import CURRENT_ALIAS, GenerationEngine, SamplingParams, _holdback, _PerRowSampling
from tests.serving.conftest import eventually


def test_per_row_sampling_greedy_and_nucleus_rows_share_a_batch() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    out = _PerRowSampling(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 0.7, 1.0]))(None, logits.clone())
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, False, False, False]  # temperature 0: greedy
    assert kept[1].tolist() == [True, True, False, False]  # top_p 0.7: 0.5 + 0.3 covers it
    assert kept[2].all()  # plain sampling keeps everything
    assert torch.allclose(out[2], logits[2])


def test_incremental_detokenization_matches_a_full_decode(tiny_model: Path) -> None:
    from alignment.models import load_tokenizer
    from serving.generation import _Row

    tokenizer = load_tokenizer(tiny_model)
    text = "Grüße aus Köln 🎉 — naïve café, 東京 too."
    row = _Row(job=None, index=0)  # type: ignore[arg-type]
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        row.tokens.append(token)
        row.decode_step(tokenizer)
        assert "\ufffd" not in row.text  # a half-decoded character is never exposed
    row.decode_step(tokenizer, flush=True)
    assert row.text == text


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
