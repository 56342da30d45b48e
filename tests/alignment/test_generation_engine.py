"""The generation engine against Hugging Face `generate` and a separate forward pass."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from alignment.devices import plan_device
from alignment.generation import AdapterError, Engine, SamplingParams
from alignment.models import load_causal_lm, load_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
TEXTS = ["hello there", "a much longer prompt about the sea and its waves", "x", "count: one two three"]


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):  # type: ignore[no-untyped-def]
    # fp32: token-for-token comparisons across batch shapes, where bf16 rounding could flip a near-tie.
    model = load_causal_lm(tiny_model, plan_device("fp32", attention="eager")).eval()
    return model, load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def lora_dirs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("engine-adapters")
    out = {}
    for name, seed, r in (("a1", 1, 4), ("a2", 2, 8)):  # different ranks: stacked with zero padding
        torch.manual_seed(seed)
        base = load_causal_lm(tiny_model, plan_device("fp32", attention="eager"))
        config = LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(root / name)
        out[name] = root / name
    return out


def prompts(tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [tokenizer(t)["input_ids"] for t in TEXTS]


def hf_greedy(model, prompt: list[int], n: int, eos: set[int]) -> list[int]:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[
            0, len(prompt) :
        ].tolist()
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return out[:cut]


def test_greedy_matches_hf_generate_token_for_token(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch_size=3)  # 4 prompts, 3 slots: one joins mid-run
    seqs = engine.generate(prompts(tokenizer), GREEDY)
    for seq in seqs:
        assert seq.tokens == hf_greedy(model, seq.prompt_ids, GREEDY.max_tokens, engine.eos_ids)
        assert seq.finish_reason in ("stop", "length")
    assert engine.stats.decode_steps > 0


def test_greedy_with_mixed_adapters_in_one_batch_matches_hf(tiny, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch_size=8)
    for name, path in lora_dirs.items():
        engine.load_adapter(name, path)
    rows = ["a1", "a2", None, "a1"]
    seqs = engine.generate(prompts(tokenizer), GREEDY, rows)
    peft = PeftModel.from_pretrained(model, str(lora_dirs["a1"]), adapter_name="a1")
    try:
        peft.load_adapter(str(lora_dirs["a2"]), adapter_name="a2")
        peft.eval()
        answers = {}
        for seq, adapter in zip(seqs, rows, strict=True):
            if adapter is None:
                with peft.disable_adapter():
                    expected = hf_greedy(peft, seq.prompt_ids, GREEDY.max_tokens, engine.eos_ids)
            else:
                peft.set_adapter(adapter)
                expected = hf_greedy(peft, seq.prompt_ids, GREEDY.max_tokens, engine.eos_ids)
            assert seq.tokens == expected, adapter
            answers[adapter] = seq.tokens
        # The adapters really change the answer (else this test could not fail).
        assert len({tuple(seqs[0].tokens), tuple(seqs[1].tokens), tuple(seqs[2].tokens)}) == 3 or (
            seqs[0].tokens != seqs[2].tokens
        )
        # A live PEFT model (PPO's policy) gives the same rows as adapters loaded from files.
        live = Engine(peft, tokenizer, max_batch_size=8)
        again = live.generate(prompts(tokenizer), GREEDY, rows)
        assert [s.tokens for s in again] == [s.tokens for s in seqs]
    finally:
        peft.unload()


def test_per_row_settings_share_a_batch(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch_size=8)
    ids = prompts(tokenizer)[1]
    alone = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=10))[0]
    rows = [
        SamplingParams(temperature=0.0, max_tokens=10),  # greedy beside sampled rows
        SamplingParams(temperature=1.5, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10),  # nucleus of one token = greedy
        SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True),
    ]
    gen = torch.Generator().manual_seed(0)
    seqs = engine.generate([ids] * 4, rows, generator=gen)
    assert seqs[0].tokens == alone.tokens
    assert seqs[2].tokens == alone.tokens
    assert len(seqs[1].tokens) == 10 and seqs[1].tokens != alone.tokens  # hot sampling differs
    assert len(seqs[3].tokens) == 3 and seqs[3].finish_reason == "length"


def test_a_seeded_row_samples_the_same_tokens_alone_or_in_any_batch(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch_size=3)
    ids = prompts(tokenizer)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True, seed=7)
    alone = engine.generate([ids[0]], seeded)[0].tokens
    hot = SamplingParams(temperature=1.2, max_tokens=12, ignore_eos=True)
    # other rows unseeded and differently seeded, a fourth prompt queued behind the three slots
    others = [hot, dataclasses.replace(seeded, seed=8), hot]
    seqs = engine.generate([ids[1], ids[0], ids[0], ids[2]], [hot, seeded, *others[1:]])
    assert seqs[1].tokens == alone
    assert seqs[2].tokens != alone  # another seed, another answer
    later = engine.generate([ids[3], ids[0]], [hot, seeded], generator=torch.Generator().manual_seed(3))
    assert later[1].tokens == alone  # nor does the engine's own generator matter


def test_stop_sequences_end_the_row_and_are_cut(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    ids = prompts(tokenizer)[0]
    full = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    assert len(full.text) > 12
    stop = full.text[8:11]
    first = full.text.find(stop)
    seqs = engine.generate(
        [ids, ids],
        [SamplingParams(temperature=0.0, max_tokens=20, stop=(stop,)), SamplingParams(0.0, 1.0, 20)],
    )
    assert seqs[0].finish_reason == "stop" and seqs[0].text == full.text[:first]
    assert len(seqs[0].tokens) < len(full.tokens)
    assert seqs[1].finish_reason != "stop" or seqs[1].tokens  # the other row is not affected
    assert seqs[1].text.startswith(full.text[: first + len(stop)]) or seqs[1].finish_reason == "stop"


def test_continuous_batching_admits_a_request_mid_answer(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch_size=4)
    long_ids, short_ids = prompts(tokenizer)[1], prompts(tokenizer)[3]
    long_params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    short_params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    solo_long = engine.generate([long_ids], long_params)[0].tokens
    solo_short = engine.generate([short_ids], short_params)[0].tokens
    long = engine.add(long_ids, long_params)
    for _ in range(8):
        engine.step()
    assert len(long.tokens) == 9 and not long.done  # prefill's token + 8 decode steps
    short = engine.add(short_ids, short_params)
    while not short.done:
        engine.step()
    assert not long.done and len(long.tokens) < 30  # the short one did not wait for the long one
    while engine.has_work():
        engine.step()
    assert short.tokens == solo_short and long.tokens == solo_long
    assert engine.running == []


def test_returned_logprobs_match_a_separate_forward_pass(tiny, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    engine.load_adapter("a1", lora_dirs["a1"])
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12, logprobs=True, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    seqs = engine.generate(prompts(tokenizer), params, ["a1", None, "a1", None], generator=gen)
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, str(lora_dirs["a1"]), adapter_name="a1").eval()
    try:
        for seq, adapter in zip(seqs, ["a1", None, "a1", None], strict=True):
            ids = torch.tensor([seq.prompt_ids + seq.tokens])
            with torch.inference_mode():
                if adapter is None:
                    with peft.disable_adapter():
                        logits = peft(input_ids=ids).logits
                else:
                    logits = peft(input_ids=ids).logits
            logp = (logits[0, len(seq.prompt_ids) - 1 : -1].float() / 0.7).log_softmax(-1)
            expected = logp.gather(1, torch.tensor(seq.tokens)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(seq.logprobs), expected, atol=1e-4)
    finally:
        peft.unload()


def test_fused_per_row_lora_matches_the_gathered_path_in_bf16(tiny_model: Path, lora_dirs) -> None:
    """bf16 on CPU puts the adapters' A into the packed base weights (one matmul gives both) and
    picks each row's columns with a mask; the per-row gathered bmm path is the reference."""
    from alignment.generation import llama
    from alignment.generation.lora import RowLora, load_adapter_files

    model = load_causal_lm(tiny_model, plan_device("bf16", attention="eager")).eval()
    w = llama.LlamaWeights(model)
    if not w.prepack:
        pytest.skip("no oneDNN bf16 prepacking on this CPU")
    adapters = {n: load_adapter_files(n, p, w.dtype, w.device) for n, p in lora_dirs.items()}
    fused = w.with_adapters(list(adapters.values()))
    rows = [adapters["a1"], adapters["a2"], None, adapters["a1"]]
    ids = torch.randint(0, model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(0))
    lengths, positions = torch.tensor([6, 4, 6, 2]), torch.arange(6)[None].expand(4, 6)
    outs = {}
    with torch.inference_mode():
        for name, weights, lora in (
            ("gathered", w, RowLora(rows, w.sizes)),
            ("fused", fused, RowLora(rows, w.sizes, fused=True)),
            ("base", w, RowLora([None] * 4, w.sizes)),
        ):
            cache = weights.new_cache(4, 16)
            prefill = llama.forward(
                weights, cache, ids, positions, lora, slots=torch.arange(4), lengths=lengths, last=lengths - 1
            )
            step = llama.forward(weights, cache, prefill.argmax(-1)[:, None], lengths[:, None], lora)
            outs[name] = torch.stack([prefill, step])
    diff = (outs["fused"] - outs["gathered"]).abs()
    effect = (outs["gathered"] - outs["base"]).abs()
    assert diff.max() <= 0.05 * effect[:, [0, 1, 3]].max()  # bf16 rounding, far below the adapters' effect
    assert diff[:, 2].max() == 0  # the base row's columns are all masked: exactly the base model
    assert torch.equal(outs["fused"][:, 2], outs["base"][:, 2])


def test_merged_adapter_samples_like_the_unmerged_one(tiny, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    engine.load_adapter("a2", lora_dirs["a2"])
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=True)
    unmerged = engine.generate(prompts(tokenizer), params, "a2")
    engine.merge("a2")
    merged = engine.generate(prompts(tokenizer), params, "a2")
    for a, b in zip(unmerged, merged, strict=True):
        assert a.tokens == b.tokens
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_single_adapter_batches_decode_on_a_cached_merged_copy(tiny, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    cached, per_row = Engine(model, tokenizer), Engine(model, tokenizer, merged_copies=0)
    for engine in (cached, per_row):
        engine.load_adapter("a2", lora_dirs["a2"])
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=True)
    fast = cached.generate(prompts(tokenizer), params, "a2")
    assert list(cached._merged_cache) == ["a2"]  # the batch really ran on the merged copy
    slow = per_row.generate(prompts(tokenizer), params, "a2")
    assert not per_row._merged_cache
    base = per_row.generate(prompts(tokenizer), params)
    assert [s.tokens for s in base] != [s.tokens for s in slow]  # the adapter changes the answers
    for a, b in zip(fast, slow, strict=True):
        assert a.tokens == b.tokens
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
    # A mixed batch keeps the per-row path: same answers as each row alone.
    mixed = cached.generate(prompts(tokenizer), params, ["a2", None, "a2", None])
    for seq, alone in zip(mixed, [fast[0], base[1], fast[2], base[3]], strict=True):
        assert seq.tokens == alone.tokens


def test_merged_copies_are_dropped_when_an_adapter_is_replaced_or_removed(tiny, lora_dirs) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, merged_copies=1)
    reference = Engine(model, tokenizer, merged_copies=0)
    for name, path in lora_dirs.items():
        reference.load_adapter(name, path)
    expected = {n: [s.tokens for s in reference.generate(prompts(tokenizer), GREEDY, n)] for n in lora_dirs}
    assert expected["a1"] != expected["a2"]
    engine.load_adapter("x", lora_dirs["a1"])
    assert [s.tokens for s in engine.generate(prompts(tokenizer), GREEDY, "x")] == expected["a1"]
    engine.load_adapter("x", lora_dirs["a2"])  # replaced under the same name (a hot swap)
    assert "x" not in engine._merged_cache
    assert [s.tokens for s in engine.generate(prompts(tokenizer), GREEDY, "x")] == expected["a2"]
    engine.load_adapter("y", lora_dirs["a1"])
    assert [s.tokens for s in engine.generate(prompts(tokenizer), GREEDY, "y")] == expected["a1"]
    assert list(engine._merged_cache) == ["y"]  # merged_copies=1: the least recent one went
    engine.remove_adapter("y")
    assert not engine._merged_cache


def test_unsupported_adapters_and_models_get_clear_errors(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        engine.load_adapter("x", tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"use_dora": true}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="DoRA"):
        engine.load_adapter("x", tmp_path)
    with pytest.raises(KeyError, match="not loaded"):
        engine.add([1, 2], GREEDY, "nope")


@pytest.mark.slow
def test_smollm2_bf16_greedy_matches_hf_generate(smollm2: Path) -> None:
    model = load_causal_lm(smollm2, plan_device("bf16", attention="eager")).eval()
    tokenizer = load_tokenizer(smollm2)
    messages = [
        [{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name a colour.")
    ]
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    ids = [list(i["input_ids"]) if isinstance(i, dict) or hasattr(i, "keys") else list(i) for i in ids]
    engine = Engine(model, tokenizer)
    for seq in engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=16)):
        assert seq.tokens == hf_greedy(model, seq.prompt_ids, 16, engine.eos_ids)


def test_sampling_draws_from_each_rows_distribution() -> None:
    from alignment.generation.sampling import BLOCK, sample, top_p_mask

    torch.manual_seed(0)
    vocab, draws = 3 * BLOCK + 7, 20000  # several blocks, the last one partial
    logits = torch.randn(2, vocab) * 3
    temperature, top_p = torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.8])
    gen = torch.Generator().manual_seed(1)
    tokens, _ = sample(logits.repeat(draws, 1), temperature.repeat(draws), top_p.repeat(draws), gen)
    tokens = tokens.view(draws, 2)
    for row in range(2):
        scaled = logits[row : row + 1] / temperature[row]
        expected = scaled.softmax(-1).masked_fill(top_p_mask(scaled, top_p[row : row + 1]), 0)[0]
        expected /= expected.sum()
        freq = torch.bincount(tokens[:, row], minlength=vocab).float() / draws
        assert (freq - expected).abs().max() < 0.015
        assert freq[expected == 0].sum() == 0  # never outside the nucleus
