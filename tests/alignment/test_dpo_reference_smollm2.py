"""On SmolLM2 in bf16: cached reference log-ratios equal what the policy computes at step 0, in any batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignment.config import load_config
from alignment.dpo import DPORunConfig, build_dpo_trainer
from alignment.runner import device_plan


@pytest.mark.parametrize("mode", ["pair", "batch"])
def test_reference_log_ratios_do_not_depend_on_the_batch(smollm2: Path, tmp_path: Path, mode: str) -> None:
    """One row per pair (the default) keeps each pair's bf16 numbers independent of its batch, and so
    does packing pairs together (`batch`) now that packed rows attend per sequence: under a full-row
    mask the bf16 attention sums changed with the row layout (0.2 nats on average, measured before)."""
    torch.set_num_threads(1)
    cfg = load_config(
        DPORunConfig,
        overrides=[
            f"model={smollm2}",
            f"output_dir={tmp_path}",
            "data.eval_fraction=0",
            "data.near_dup_threshold=null",
            "training.dtype=bf16",
            "tracking.report_to=none",
            "dpo.precompute_ref_log_probs=false",
            f"dpo.share_prompt={mode}",
        ],
    )
    if device_plan(cfg).dtype != torch.bfloat16:
        pytest.skip("no native bf16 here")
    trainer = build_dpo_trainer(cfg)
    model, rows = trainer.model.eval(), [trainer.train_dataset[i] for i in range(8)]

    def log_ratios(batch_rows: list[dict]) -> torch.Tensor:
        batch = trainer._prepare_inputs(trainer.data_collator(batch_rows))
        with torch.no_grad():
            chosen, rejected = trainer.compute_ref_log_probs(model, batch)
        return (chosen - rejected).float()

    together = log_ratios(rows)
    apart = torch.cat([log_ratios(rows[0:8:2]), log_ratios(rows[1:8:2])])
    drift = (together[[0, 2, 4, 6, 1, 3, 5, 7]] - apart).abs().max().item()
    assert drift < 1e-3, drift


def test_batched_attention_gives_the_per_sequence_numbers_bit_for_bit(
    smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU in bf16, all sequences in one batched call (`_batched_attention`) equal the loop exactly,
    so which path a forward takes never changes a number (the cached reference stays exact)."""
    from alignment import shared_prompt
    from alignment.models import load_causal_lm, load_tokenizer
    from alignment.preference_data import PreferenceDataSettings, prepare_preferences

    torch.set_num_threads(1)
    model = load_causal_lm(smollm2).eval()
    if model.dtype != torch.bfloat16:
        pytest.skip("no native bf16 here")
    shared_prompt.use_segment_attention(model)
    tokenizer = load_tokenizer(smollm2)
    rows, _, _ = prepare_preferences(PreferenceDataSettings(eval_fraction=0), tokenizer)

    def ids(messages: list[dict], prompt: bool = False) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompts, chosen, rejected = [], [], []
    for row in [rows[i] for i in range(6)]:
        p = ids(row["prompt"], prompt=True)
        prompts.append(torch.tensor(p))
        chosen.append(torch.tensor(ids(row["prompt"] + row["chosen"])[len(p) :]))
        rejected.append(torch.tensor(ids(row["prompt"] + row["rejected"])[len(p) :]))
    for across_pairs in (True, False):
        packed = shared_prompt.pack_pairs(prompts, chosen, rejected, across_pairs=across_pairs)
        hidden = {}
        monkeypatch.setattr(shared_prompt, "BATCHED_MAX_WASTE", float("inf"))
        for path, budget in (("loop", 0), ("batched", 2**40)):
            monkeypatch.setattr(shared_prompt, "BATCHED_SCORES_BYTES", budget)
            with torch.no_grad():
                hidden[path] = model.model(
                    input_ids=packed.input_ids,
                    position_ids=packed.position_ids,
                    pair_segments=packed.segments,
                ).last_hidden_state
        real = packed.token_mask.bool()
        assert torch.equal(hidden["loop"][real], hidden["batched"][real]), across_pairs
