"""The TRL internals `alignment.trl_compat` hooks into still exist with the shapes it relies on.

An override of a private method that TRL renamed would silently stop being called; these checks
make a TRL upgrade that moves one of them fail here, next to the one file to change.
"""

from __future__ import annotations

import inspect

from trl import DPOTrainer, RewardTrainer

from alignment.trl_compat import CachedReferenceDPOTrainer, ExtraColumnsRewardTrainer


def parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_dpo_hooks_match_trl() -> None:
    assert parameters(DPOTrainer._precompute_ref_logps) == parameters(
        CachedReferenceDPOTrainer._precompute_ref_logps
    )
    assert parameters(DPOTrainer.compute_ref_log_probs) == ["self", "model", "inputs"]
    # `_compute_loss` takes the reference from the batch when this attribute is set, and
    # `__init__` precomputes by itself when the config flag is set (which we hide from it).
    assert "self.precompute_ref_logps" in inspect.getsource(DPOTrainer._compute_loss)
    assert "args.precompute_ref_log_probs" in inspect.getsource(DPOTrainer.__init__)
    # The fused-head contract: TRL calls the model with fused_lm_head=True and reads log_probs.
    assert "fused_lm_head=True" in inspect.getsource(DPOTrainer.compute_ref_log_probs)


def test_reward_hooks_match_trl() -> None:
    assert parameters(RewardTrainer._prepare_dataset) == parameters(
        ExtraColumnsRewardTrainer._prepare_dataset
    )
    source = inspect.getsource(RewardTrainer._set_signature_columns_if_needed)
    assert '["chosen_ids", "rejected_ids", "margin"]' in source  # the columns we extend
    assert "margin" in inspect.getsource(RewardTrainer.compute_loss)
