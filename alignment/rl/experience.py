"""Experience for one PPO step, phase by phase; each phase a plain function of tensors and models.

    rollout = generate_rollouts(policy, tokenizer, prompt_ids, prompts, generation)   # sampling
    raw, scores = score_rollouts(reward_fn, rollout, missing_eos_penalty)             # reward
    logprobs, ref_logprobs, values = rollout_logprobs_and_values(policy, critic, ...) # no grad
    experience, stats = compute_advantages(rollout, scores, ..., kl_coef, ppo)        # rewards + GAE

Being separate functions, a distributed runner can place the phases on different workers
(OpenRLHF-style rollout / reference / reward / critic actors) or run all of them on each
data-parallel copy, as `alignment.rl.ray_worker` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alignment.generation import Engine, SamplingParams
from alignment.messages import Message
from alignment.rl.config import GenerationSettings, PPOConfig, RewardFn
from alignment.rl.data import pad
from alignment.rl.losses import compute_gae, masked_mean, masked_whiten, per_token_rewards
from alignment.rl.models import (
    Critic,
    PackedRollouts,
    critic_values,
    forward_policy,
    pack_rollouts,
    reference_policy,
)

# --- phase 1: rollouts -------------------------------------------------------------------------------


@dataclass
class Rollout:
    """Sampled responses. Queries are left-padded, responses right-padded after their first EOS."""

    prompts: list[list[Message]]
    responses: list[str]
    query_ids: torch.Tensor  # (B, Q)
    query_mask: torch.Tensor  # (B, Q)
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) 1 up to and including the first EOS
    ended_with_eos: torch.Tensor  # (B,) bool

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def rollout_engine(policy: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> Engine:
    """The generation engine rollouts sample from (kept by the trainer across steps)."""
    return Engine(policy, tokenizer, max_batch_size=batch_size, eos_token_ids=[tokenizer.eos_token_id])


def only_lora_trains(policy: nn.Module) -> bool:
    """Whether every trainable weight of the policy is a LoRA adapter's (the base is frozen)."""
    return all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)


@torch.no_grad()
def generate_rollouts(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    prompts: Sequence[list[Message]],
    generation: GenerationSettings,
    engine: Engine | None = None,
) -> Rollout:
    """Sample with the generation engine (alignment.generation) from the policy's current weights,
    its LoRA merged into a bf16 copy (log-prob drift vs the unmerged policy: bench/README.md).
    Plain temperature/top_p sampling: exactly the distribution the logprobs describe."""
    device = next(policy.parameters()).device
    engine = engine or rollout_engine(policy, tokenizer, len(prompt_ids))
    adapter = policy.active_adapter if hasattr(policy, "peft_config") else None
    if engine.merged == adapter and adapter is not None and only_lora_trains(policy):
        # Only the LoRA weights changed since the last rollout: re-merge them into the engine's
        # copy; re-reading (re-fusing, re-packing) the frozen base too cost 0.4-0.6 CPU-s vs 0.22.
        engine.refresh_adapters()
    else:
        engine.refresh(merge=adapter)  # the policy has changed since the last rollout
    params = SamplingParams(generation.temperature, generation.top_p, generation.max_new_tokens)
    seqs = engine.generate(prompt_ids, params, adapter)
    rows = [s.tokens + ([s.eos_token] if s.eos_token is not None else []) for s in seqs]
    query_ids = pad(prompt_ids, tokenizer.pad_token_id, "left").to(device)
    query_mask = pad([[1] * len(p) for p in prompt_ids], 0, "left").to(device)
    response_ids = pad(rows, tokenizer.pad_token_id, "right").to(device)
    response_mask = pad([[1] * len(r) for r in rows], 0, "right").to(device)
    ended_with_eos = torch.tensor([s.eos_token is not None for s in seqs], device=device)
    responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(
        list(prompts), responses, query_ids, query_mask, response_ids, response_mask, ended_with_eos
    )


# --- phase 2: scores ---------------------------------------------------------------------------------


def score_rollouts(
    reward_fn: RewardFn, rollout: Rollout, missing_eos_penalty: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw reward-model scores, scores after the missing-EOS penalty), both (B,)."""
    raw = reward_fn(rollout.prompts, rollout.responses)
    if len(raw) != len(rollout.responses):
        raise ValueError(f"reward function returned {len(raw)} scores for {len(rollout.responses)} responses")
    raw_scores = torch.tensor(raw, dtype=torch.float32, device=rollout.response_ids.device)
    scores = raw_scores.clone()
    if missing_eos_penalty is not None:
        # A truncated response would otherwise be judged on text it never finished (N+ details).
        scores[~rollout.ended_with_eos] -= missing_eos_penalty
    return raw_scores, scores


# --- phase 3: forward passes without grad ------------------------------------------------------------


@torch.no_grad()
def rollout_logprobs_and_values(
    policy: nn.Module, critic: Critic, rollout: Rollout, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi_theta_old, log pi_ref and V_old for a rollout (three packed forward passes, no grad)."""
    T = rollout.response_ids.shape[1]
    ids, mask = rollout.input_ids, rollout.attention_mask
    packed = pack_rollouts(ids, mask, T)  # one layout for the three passes
    logprobs, values = policy_logprobs_and_values(policy, critic, ids, mask, T, temperature, packed)
    ref_logprobs = reference_logprobs(policy, rollout, temperature, packed)
    return logprobs, ref_logprobs, values


@torch.no_grad()
def policy_logprobs_and_values(
    policy: nn.Module,
    critic: Critic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    temperature: float,
    packed: PackedRollouts | None = None,
    values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_theta_old and V_old of rollout rows (no grad): the policy's pass, then the critic's
    (a separate critic's only with `values`; a shared one's head costs nothing)."""
    T = response_length
    packed = packed or pack_rollouts(input_ids, attention_mask, T)
    logprobs, _, hidden = forward_policy(
        policy, input_ids, attention_mask, T, temperature, with_hidden=critic.shared, rollouts=packed
    )
    if critic.shared:
        return logprobs, critic.head(hidden)
    if not values:
        return logprobs, None
    return logprobs, old_values(critic, input_ids, attention_mask, T, packed)


@torch.no_grad()
def old_values(
    critic: Critic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    packed: PackedRollouts | None = None,
) -> torch.Tensor:
    """V_old of rollout rows from a separate critic (no grad)."""
    return critic_values(critic, input_ids, attention_mask, response_length, packed)


@torch.no_grad()
def reference_logprobs(
    policy: nn.Module, rollout: Rollout, temperature: float, packed: PackedRollouts | None = None
) -> torch.Tensor:
    """log pi_ref of a rollout's response tokens (no grad)."""
    T = rollout.response_ids.shape[1]
    ids, mask = rollout.input_ids, rollout.attention_mask
    with reference_policy(policy) as reference:
        ref_logprobs, _, _ = forward_policy(reference, ids, mask, T, temperature, rollouts=packed)
    return ref_logprobs


# --- phase 4: advantages --------------------------------------------------------------------------------


@dataclass
class Experience:
    """Everything one PPO update needs; rows index rollouts, so minibatches are row selections."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, rows: torch.Tensor) -> Experience:
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def compute_advantages(
    rollout: Rollout,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    kl_coef: float,
    config: PPOConfig,
) -> tuple[Experience, dict[str, float]]:
    mask = rollout.response_mask.float()
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, config.kl_estimator)
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    experience = Experience(
        rollout.input_ids, rollout.attention_mask, mask, logprobs, values * mask, advantages, returns
    )
    stats = {
        "objective/kl": kl.sum(1).mean().item(),
        "objective/non_score_reward": (-kl_coef * kl).sum(1).mean().item(),
        "objective/rlhf_reward": (scores - kl_coef * kl.sum(1)).mean().item(),
        "value/mean": masked_mean(values, mask).item(),
        "value/returns": masked_mean(returns, mask).item(),
    }
    return experience, stats
