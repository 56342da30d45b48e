"""Packed pairs give every completion token the log-prob it has in its own full sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignment import shared_prompt
from alignment.shared_prompt import mask_for_attention, pack_pairs, use_segment_attention


@pytest.fixture(params=["per-sequence", "batched"])
def segment_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """SEGMENT_ATTENTION's two CPU paths: the per-sequence loop, or all sequences in one batch."""
    monkeypatch.setattr(
        shared_prompt, "BATCHED_SCORES_BYTES", 0 if request.param == "per-sequence" else 2**40
    )
    monkeypatch.setattr(shared_prompt, "BATCHED_MAX_WASTE", float("inf"))
    return request.param


def sequences() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(5, 200, (n,), generator=g)

    system = ids(6)  # a batch prefix, like a chat template's system prompt
    prompts = [
        torch.cat([system, ids(3)]),
        torch.cat([system, ids(7)]),
        system.clone(),
        torch.cat([system, ids(1)]),
    ]
    chosen = [ids(4), ids(1), ids(5), ids(2)]
    rejected = [ids(2), ids(6), ids(1), ids(3)]
    return prompts, chosen, rejected


def completion_log_probs(
    model: torch.nn.Module, hidden: torch.Tensor, predictors: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[predictors]).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def packed_hidden(model: torch.nn.Module, packed, attention: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The packed rows' final hidden states: per-sequence attention, or the full-row mask (eager/SDPA)."""
    if attention == "segments":
        return model.model(
            input_ids=packed.input_ids, position_ids=packed.position_ids, pair_segments=packed.segments
        ).last_hidden_state
    return model.model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=mask_for_attention(packed.attention_mask, model, torch.float32),
    ).last_hidden_state


@pytest.mark.parametrize("attention", ["segments", "batched", "eager", "sdpa"])  # how packed rows attend
@pytest.mark.parametrize("reference", ["eager", "sdpa"])  # how the full sequences attend
@pytest.mark.parametrize("row_tokens", [512, 20])  # one row for all pairs / a row per pair or two
@pytest.mark.parametrize("shared_system", [True, False])
@pytest.mark.parametrize("across_pairs", [True, False])
def test_packed_log_probs_equal_full_sequences(
    tiny_model: Path,
    attention: str,
    reference: str,
    row_tokens: int,
    shared_system: bool,
    across_pairs: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SEGMENT_ATTENTION's two CPU paths: the per-sequence loop, or whole-row masked attention
    monkeypatch.setattr(shared_prompt, "BATCHED_SCORES_BYTES", 0 if attention == "segments" else 2**40)
    monkeypatch.setattr(shared_prompt, "BATCHED_MAX_WASTE", float("inf"))
    segments = attention in ("segments", "batched")
    from transformers import AutoModelForCausalLM

    def load(implementation: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(
            tiny_model, dtype=torch.float32, attn_implementation=implementation
        ).eval()

    model = load("sdpa" if segments else attention)
    if segments:
        use_segment_attention(model)
    full_model = load(reference)
    prompts, chosen, rejected = sequences()
    if not shared_system:  # no batch prefix at all
        prompts = [torch.cat([torch.tensor([b + 1]), p]) for b, p in enumerate(prompts)]
    packed = pack_pairs(prompts, chosen, rejected, row_tokens=row_tokens, across_pairs=across_pairs)
    if across_pairs:
        assert (packed.input_ids.shape[0] > 1) == (row_tokens == 20)
        assert (packed.places[0].prefix > 0) == shared_system
    else:
        assert packed.input_ids.shape[0] == len(prompts) and packed.places[0].prefix == 0
    with torch.no_grad():
        hidden = packed_hidden(model, packed, "segments" if segments else attention)
        for b, place in enumerate(packed.places):
            for side, completion in (("chosen", chosen[b]), ("rejected", rejected[b])):
                full = torch.cat([prompts[b], completion])[None]
                logits = full_model(input_ids=full).logits[0, len(prompts[b]) - 1 : -1].float()
                expected = logits.log_softmax(-1).gather(-1, completion[:, None]).squeeze(-1)
                got = completion_log_probs(model, hidden, packed.predictor_index(place, side), completion)
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"pair {b} {side}")


def test_packing_runs_the_batch_prefix_once_per_row() -> None:
    prompts, chosen, rejected = sequences()
    packed = pack_pairs(prompts, chosen, rejected)
    distinct = 6 + sum(
        len(p) - 6 + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True)
    )
    assert packed.input_ids.shape == (1, distinct)
    assert int(packed.token_mask.sum()) == distinct
    full = sum(len(p) + len(c) + len(p) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True))
    assert distinct < full / 2


def test_pack_pairs_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="same positive number"):
        pack_pairs([torch.tensor([1])], [], [])


@pytest.mark.parametrize("keep_scores", [False, True])  # recompute the scores in the backward / keep them
def test_segment_attention_gradients_equal_full_row_mask(
    tiny_model: Path, keep_scores: bool, segment_path: str
) -> None:
    from transformers import AutoModelForCausalLM

    def gradients(attention: str) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model, dtype=torch.float32, attn_implementation="eager" if attention == "eager" else "sdpa"
        )
        if attention == "segments":
            use_segment_attention(model)
        prompts, chosen, rejected = sequences()
        packed = pack_pairs(prompts, chosen, rejected)
        if attention == "segments":
            hidden = model.model(
                input_ids=packed.input_ids,
                position_ids=packed.position_ids,
                pair_segments=packed.segments,
                keep_attention_scores=keep_scores,
            ).last_hidden_state
        else:
            hidden = packed_hidden(model, packed, attention)
        loss = sum(
            completion_log_probs(model, hidden, packed.predictor_index(place, side), ids).sum()
            for place, c, r in zip(packed.places, chosen, rejected, strict=True)
            for side, ids in (("chosen", c), ("rejected", r))
        )
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    got, expected = gradients("segments"), gradients("eager")
    assert got.keys() == expected.keys() and any("self_attn" in name for name in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-4, rtol=1e-4, msg=name)
