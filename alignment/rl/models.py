"""The models PPO trains and reads: policy pi_theta, reference pi_ref, critic V_phi, and their forward passes.

policy    pi_theta  the init (SFT) LoRA adapter, trainable (or a fresh LoRA on the base)
reference pi_ref    the same weights with the adapter disabled, or a frozen copy of the init adapter
                    loaded as a second adapter on the same base: never a second full model
critic    V_phi     a scalar value head, on the policy's trunk ("shared") or on its own small
                    LoRA model ("separate")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel

from alignment.devices import DevicePlan
from alignment.lm_head import completion_log_probs
from alignment.lora_addmm import use_addmm_lora
from alignment.lora_precision import cast_adapter_params
from alignment.models import adapter_base_model, check_adapter, load_causal_lm, load_with_adapter
from alignment.policy import load_run_policy
from alignment.rl.config import PPORunConfig
from alignment.runner import lora_config
from alignment.shared_prompt import (
    PackedPairs,
    pack_pairs,
    use_segment_attention,
    uses_segment_attention,
)

VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_DIR = "critic"
REFERENCE_ADAPTER = "reference"


class ValueHead(nn.Module):
    """V(s_t): a linear map from a hidden state to a scalar, for every token position."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # V starts at 0 everywhere: the critic learns the scale of the rewards instead of guessing it.
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)


class Critic(nn.Module):
    """V_phi. `trunk` is its own LoRA model ("separate"), or None when it reads the policy's hidden states."""

    def __init__(self, head: ValueHead, trunk: nn.Module | None = None) -> None:
        super().__init__()
        self.head = head
        self.trunk = trunk

    @property
    def shared(self) -> bool:
        return self.trunk is None


def load_policy(config: PPORunConfig, plan: DevicePlan) -> nn.Module:
    """pi_theta as a PeftModel: the init adapter (trainable) or a fresh LoRA; plus a frozen reference copy."""
    policy, _ = load_run_policy(config, plan, wrap_lora=True)
    if config.init_adapter is not None and config.ppo.reference == "init_adapter":
        policy.load_adapter(
            check_adapter(config.init_adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False
        )
    adapters_in_model_dtype(policy, config, plan)
    use_addmm_lora(policy)  # each LoRA linear one addmm, its scale fused (`alignment.lora_addmm`)
    use_segment_attention(policy.get_base_model())  # the packed passes attend per sequence
    # No dropout anywhere: it would make pi_theta / pi_theta_old != 1 before any update (N+ details).
    return policy.eval()


def adapters_in_model_dtype(model: nn.Module, config: PPORunConfig, plan: DevicePlan) -> None:
    """LoRA weights in bf16 on a bf16 base (`training.mixed_precision` master/pure; the trainer keeps
    fp32 masters for "master"), so no layer casts its activations to fp32 and back: those copies were
    a fifth of a PPO step's CPU time. "autocast" keeps PEFT's fp32 adapters (the numerics before)."""
    if plan.dtype == torch.bfloat16 and config.training.mixed_precision != "autocast":
        cast_adapter_params(model, torch.bfloat16)


def load_critic(config: PPORunConfig, plan: DevicePlan, policy: nn.Module) -> Critic:
    hidden_size = policy.get_base_model().config.hidden_size
    if config.ppo.critic == "shared":
        return Critic(ValueHead(hidden_size)).to(plan.device)
    from peft import get_peft_model

    # AutoModel: the trunk without the LM head, so the critic never builds vocabulary-sized logits.
    trunk = load_causal_lm(
        config.ppo.critic_model or config.base_model(),
        plan,
        model_cls=AutoModel,
        trust_remote_code=config.trust_remote_code,
    )
    trunk = get_peft_model(trunk, lora_config(config.lora, task_type="FEATURE_EXTRACTION"))
    adapters_in_model_dtype(trunk, config, plan)
    use_addmm_lora(trunk)
    use_segment_attention(trunk.get_base_model())
    return Critic(ValueHead(trunk.get_base_model().config.hidden_size), trunk).to(plan.device).eval()


@contextmanager
def reference_policy(policy: nn.Module) -> Iterator[nn.Module]:
    """pi_ref on the policy's own weights: the frozen init-adapter copy if loaded, else adapters off."""
    if REFERENCE_ADAPTER in policy.peft_config:
        policy.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield policy
        finally:
            policy.set_adapter("default")  # also makes "default" trainable again and "reference" frozen
    else:
        with policy.disable_adapter():
            yield policy


def load_ppo_models(run_dir: str | Path, plan: DevicePlan | None = None) -> tuple[nn.Module, Critic]:
    """Reload a finished PPO run: (policy with its adapter, critic with its value head)."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    policy = load_with_adapter(None, run_dir, plan).eval()
    critic_dir = run_dir / CRITIC_DIR
    if critic_dir.is_dir():
        trunk = load_causal_lm(adapter_base_model(critic_dir), plan, model_cls=AutoModel)
        trunk = PeftModel.from_pretrained(trunk, check_adapter(critic_dir)).eval()
        head_path = critic_dir / VALUE_HEAD_FILE
    else:
        trunk = None
        head_path = run_dir / VALUE_HEAD_FILE
    state = load_file(str(head_path))
    head = ValueHead(state["summary.weight"].shape[1])
    head.load_state_dict(state)
    device = next(policy.parameters()).device
    return policy, Critic(head, trunk).to(device)


# --- forward passes --------------------------------------------------------------------------------
#
# A rollout batch arrives as (B, Q + T) rows: prompts left-padded, responses right-padded. The passes
# below run it padding-free instead (`pack_rollouts`): each sequence's prompt and response packed into
# one row, the chat template's prefix shared by the batch run once, each layer attending per sequence (`alignment.shared_prompt`), and the LM head / value head applied to the
# response positions only. On the bench batch (16 prompts of 35-77 tokens, 64 new tokens) that is
# about 950 tokens instead of 2256. Per-sequence attention keeps a sequence's numbers independent of
# which rollouts share its rows, so the old log-probs of the whole batch equal those of the training
# minibatches (the PPO ratio starts at 1; tested).


@dataclass
class PackedRollouts:
    """Rollouts packed padding-free, and where each response token's predictor sits."""

    packed: PackedPairs
    predictor: torch.Tensor  # (N,) flat index into (rows*W) of each response token's predictor
    targets: torch.Tensor  # (N,) the response tokens
    rows: torch.Tensor  # (N,) their row in the (B, T) response layout
    cols: torch.Tensor  # (N,) their column there
    shape: tuple[int, int]  # (B, T)

    def place(self, values: torch.Tensor) -> torch.Tensor:
        """(N, ...) per-token values -> (B, T, ...), zero at padding; keeps the autograd graph."""
        out = values.new_zeros(self.shape + values.shape[1:])
        return out.index_put((self.rows, self.cols), values)


def pack_rollouts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
) -> PackedRollouts:
    """(B, Q + T) left-padded prompts + right-padded responses -> `PackedRollouts`."""
    query_width = input_ids.shape[1] - response_length
    mask = attention_mask.bool()
    prompts, responses = [], []
    for ids, keep in zip(input_ids, mask, strict=True):
        prompts.append(ids[:query_width][keep[:query_width]])
        responses.append(ids[query_width:][keep[query_width:]])
    empty = [input_ids.new_zeros(0)] * len(prompts)
    # Responses in the "chosen" slot; no "rejected" side. One row (`row_tokens=None`): attention runs
    # per sequence, so a wide row costs nothing, while ~256-token rows repeated the shared prefix in
    # every row and padded each to the longest (update phase 16.4 -> 14.0 CPU-s with this alone).
    packed = pack_pairs(prompts, responses, empty, pad_id=0, row_tokens=None)
    predictor, rows, cols = [], [], []
    for b, place in enumerate(packed.places):
        if not place.chosen:
            continue
        predictor.append(packed.predictor_index(place, "chosen"))
        rows.append(torch.full((place.chosen,), b, dtype=torch.long))
        cols.append(torch.arange(place.chosen))
    device = input_ids.device
    return PackedRollouts(
        packed,
        torch.cat(predictor),
        torch.cat(responses),
        torch.cat(rows).to(device),
        torch.cat(cols).to(device),
        (input_ids.shape[0], response_length),
    )


def _trunk(model: nn.Module) -> nn.Module:
    """The transformer under a (PEFT-wrapped) causal LM or feature model: hidden states, no heads."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "base_model", inner)


def packed_hidden(model: nn.Module, rollouts: PackedRollouts) -> torch.Tensor:
    """(N, H) last hidden states at the predictor of each response token, from packed rows."""
    trunk = _trunk(model)
    if not uses_segment_attention(trunk):
        use_segment_attention(trunk)  # packed rows attend per sequence; unpacked calls get SDPA
    packed = rollouts.packed
    hidden = trunk(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        pair_segments=packed.segments,
        # Each sequence's scores are (heads, ~140, ~140): small, so the update's backward keeps them
        # rather than recomputing them (update phase 14.0 -> 12.6 CPU-s; bench/README.md).
        keep_attention_scores=torch.is_grad_enabled(),
        use_cache=False,
    ).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[rollouts.predictor]


def forward_policy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    temperature: float,
    with_hidden: bool = False,
    rollouts: PackedRollouts | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log pi(y_t | x, y_<t), entropy, last hidden states) for the response tokens, each (B, T[, H]).

    Logits are divided by the sampling temperature, so the logprobs are those of the sampling
    distribution; only the response tokens reach the LM head, a chunk at a time (`completion_log_probs`).
    """
    rollouts = rollouts or pack_rollouts(input_ids, attention_mask, response_length)
    hidden = packed_hidden(model, rollouts)
    head = model.get_output_embeddings().weight
    # (h / tau) W^T = (h W^T) / tau: the temperature applied to the N hidden rows, not the N x V logits.
    logprobs, entropy, _, _ = completion_log_probs(hidden / temperature, head, rollouts.targets)
    placed_hidden = rollouts.place(hidden) if with_hidden else None
    return rollouts.place(logprobs), rollouts.place(entropy), placed_hidden


def critic_values(
    critic: Critic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    rollouts: PackedRollouts | None = None,
) -> torch.Tensor:
    """V(s_t) for the state before each response token, from a separate critic's own trunk."""
    assert critic.trunk is not None
    rollouts = rollouts or pack_rollouts(input_ids, attention_mask, response_length)
    return rollouts.place(critic.head(packed_hidden(critic.trunk, rollouts)))
