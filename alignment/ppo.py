"""Proximal Policy Optimization for RLHF: prefloop's own PPO (TRL 1.x no longer ships a PPOTrainer).

config = load_config(PPORunConfig, "configs/ppo.yaml", ["ppo.init_kl_coef=0.1"])
metrics = train_ppo(config, reward_fn)   # reward_fn(prompts, responses) -> list[float]

The losses follow "The N+ Implementation Details of RLHF with PPO" (Huang et al., 2024), Ziegler et
al. (2019) for the KL penalty and its adaptive controller, Schulman et al. (2016) for GAE and
InstructGPT (Ouyang et al., 2022, eq. 2) for PPO-ptx; variable names are the papers'.

    policy    pi_theta  the init (SFT) LoRA adapter, trainable
    reference pi_ref    the same weights with the adapter disabled, or a frozen copy of the init adapter
                        loaded as a second adapter on the same base: never a second full model
    critic    V_phi     a scalar value head, on the policy's trunk ("shared") or on its own small
                        LoRA model ("separate")
    reward    r(x, y)   any scoring callable (a reward model from `reward/`, or a program)

One PPO step is four phases, each a plain function of tensors and models, so that a distributed
runner can place them on different workers (OpenRLHF-style rollout / reference / reward / critic
actors, or data-parallel copies of all of them):

    rollout = generate_rollouts(policy, tokenizer, prompt_ids, prompts, generation)   # sampling
    scores = score_rollouts(reward_fn, rollout, missing_eos_penalty)                  # reward model
    logprobs, ref_logprobs, values = ...forward passes (policy, reference, critic)    # no grad
    experience = compute_advantages(...)                                              # per-token rewards + GAE
    stats = trainer.update(experience)                                                # PPO epochs x minibatches
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, GenerationConfig, PreTrainedTokenizerBase, get_scheduler

from alignment.config import ConfigError, StrictModel, dump_config
from alignment.data_files import DataError, read_rows
from alignment.devices import DevicePlan
from alignment.models import adapter_base_model, load_causal_lm, load_tokenizer, load_with_adapter
from alignment.runner import (
    PolicyRunConfig,
    data_fingerprint,
    device_plan,
    lora_config,
    setup_tracking,
    write_model_card,
)
from alignment.sft_data import Message, load_conversations, to_prompt_completion

log = logging.getLogger(__name__)

EXAMPLE_PROMPTS = Path(__file__).parent / "data" / "sft_house_style.jsonl"
VALUE_HEAD_FILE = "value_head.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"  # checkpoint-N/: optimizers, schedulers, KL, RNG, sampler
CRITIC_DIR = "critic"
REFERENCE_ADAPTER = "reference"

Prompt = str | list[Message]
RewardFn = Callable[[list[list[Message]] | list[str], list[str]], list[float]]


# --- config -----------------------------------------------------------------------------------------


class GenerationSettings(StrictModel):
    max_new_tokens: int = Field(64, gt=0, description="Response length cap; longer responses are truncated.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; logprobs use the same one.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1.0 = the full distribution).")


class PPOConfig(StrictModel):
    """PPO hyperparameters, named as in the papers."""

    rollout_batch_size: int = Field(16, ge=1, description="Prompts sampled per PPO step.")
    mini_batch_size: int = Field(8, ge=1, description="Rollouts per optimizer step.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="epsilon of the clipped policy ratio.")
    cliprange_value: float = Field(0.2, gt=0, description="Clip range of the value prediction.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss weight (shared trunk only).")
    kl_controller: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="Fixed beta, or Ziegler et al.'s proportional controller towards target_kl."
    )
    init_kl_coef: float = Field(0.05, ge=0, description="beta: weight of the per-token KL penalty.")
    target_kl: float = Field(6.0, gt=0, description="Adaptive controller's target KL (nats per response).")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive controller's horizon (rollouts).")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="k1 = log-ratio (unbiased), k3 = (ratio-1) - log ratio (non-negative, lower variance).",
    )
    score_norm: Literal["none", "running"] = Field(
        "none", description="Normalise reward scores by their running mean/std before the KL penalty."
    )
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards (scale only) before GAE.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 per batch.")
    missing_eos_penalty: float | None = Field(
        1.0, description="Subtracted from the score of responses that hit max_new_tokens without EOS."
    )
    ptx_coef: float = Field(
        0.0, ge=0, description="gamma_ptx: weight of the SFT (pretraining) loss; 0 = off."
    )
    ptx_batch_size: int = Field(4, ge=1, description="SFT examples per optimizer step for PPO-ptx.")
    critic: Literal["shared", "separate"] = Field(
        "separate", description="Value head on the policy trunk, or on its own LoRA model."
    )
    critic_model: str | None = Field(
        None, description="Base of the separate critic (default: the policy's base model)."
    )
    critic_learning_rate: float | None = Field(None, gt=0, description="Default: training.learning_rate.")
    reference: Literal["init_adapter", "base"] = Field(
        "init_adapter",
        description="Frozen copy of the init adapter, or the base with adapters disabled (always the "
        "base when there is no init adapter).",
    )
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


class PPODataSettings(StrictModel):
    prompts: Path = Field(
        EXAMPLE_PROMPTS,
        description="JSONL/datasets rows with 'prompt' (text or messages), preference pairs, or SFT "
        "'messages' (their user turns are the prompts).",
    )
    max_prompt_length: int = Field(256, gt=0, description="Longer prompts are dropped (and counted).")
    ptx: Path | None = Field(None, description="SFT data for PPO-ptx (messages or Alpaca rows).")
    ptx_max_length: int = Field(512, gt=8, description="Tokens per PPO-ptx example (truncated).")


class RLRunConfig(PolicyRunConfig):
    """What every RL run from a reward (PPO, GRPO, RLOO) adds: the reward model."""

    reward_model: str | None = Field(
        None, description="Reward model directory; the `prefloop train` command builds the reward from it."
    )


class PPORunConfig(RLRunConfig):
    """`training.max_steps` counts PPO steps (rollout batches), `training.epochs` passes over the prompts;
    batch sizes live in `ppo` (rollout_batch_size, mini_batch_size), so `training.batch_size` is unused."""

    output_dir: Path = Path("runs/ppo")
    data: PPODataSettings = Field(default_factory=PPODataSettings)
    ppo: PPOConfig = Field(default_factory=PPOConfig)


# --- masked statistics ------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    n = mask.sum()
    # Bessel's correction, as in the reference implementations.
    return masked_mean((values - mean) ** 2, mask) * n / (n - 1).clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries; without shift_mean the mean is kept (reward whitening)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


class RunningMoments:
    """Running mean and std of reward scores (Chan et al.'s parallel update), for score normalisation."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        batch_mean, batch_var, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))


# --- KL controllers (Ziegler et al., 2019, section 2.2) ---------------------------------------------


class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """beta_{t+1} = beta_t (1 + K_beta e_t),  e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),  K_beta = n / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


def kl_controller(config: PPOConfig) -> FixedKLController | AdaptiveKLController:
    if config.kl_controller == "fixed":
        return FixedKLController(config.init_kl_coef)
    return AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)


# --- the losses --------------------------------------------------------------------------------------


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta KL_t at every response token, plus the score r(x, y) on the last one (the EOS).

    Returns (rewards, kl), both (B, T) and zero past each response's end.
    """
    log_ratio = (logprobs - ref_logprobs) * response_mask
    kl = log_ratio if kl_estimator == "k1" else (torch.expm1(-log_ratio) + log_ratio)
    kl = kl * response_mask
    rewards = -kl_coef * kl
    last = response_mask.sum(1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016).

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma lam A_{t+1};  returns_t = A_t + V(s_t).
    r and V are zero past the end of a response, so the last token bootstraps from nothing.
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    returns = advantages + values
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L^CLIP = -E[min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)],  ratio = pi_theta / pi_theta_old."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
            "policy/approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "policy/ratio": masked_mean(ratio, mask),
        }
    return pg_loss, stats


def value_loss(
    vpred: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L^V = 1/2 E[max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)]."""
    vpredclipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (vpred - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        stats = {"value/clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask)}
    return vf_loss, stats


# --- models: policy, reference, critic ---------------------------------------------------------------


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


def load_policy_tokenizer(init_adapter: Path | None, base_model: str) -> PreTrainedTokenizerBase:
    """The init adapter's own tokenizer when its run saved one (SFT runs do), else the base model's."""
    if init_adapter is not None and (Path(init_adapter) / "tokenizer_config.json").is_file():
        return load_tokenizer(init_adapter)
    return load_tokenizer(base_model)


def load_policy(config: PPORunConfig, plan: DevicePlan) -> nn.Module:
    """pi_theta as a PeftModel: the init adapter (trainable) or a fresh LoRA; plus a frozen reference copy."""
    from peft import get_peft_model

    if config.init_adapter is not None:
        policy = load_with_adapter(config.base_model(), config.init_adapter, plan, trainable=True)
        if config.ppo.reference == "init_adapter":
            policy.load_adapter(str(config.init_adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    else:
        base = load_causal_lm(config.base_model(), plan, quantization=config.lora.quantization)
        policy = get_peft_model(base, lora_config(config.lora))
    # No dropout anywhere: it would make pi_theta / pi_theta_old != 1 before any update (N+ details).
    return policy.eval()


def load_critic(config: PPORunConfig, plan: DevicePlan, policy: nn.Module) -> Critic:
    hidden_size = policy.get_base_model().config.hidden_size
    if config.ppo.critic == "shared":
        return Critic(ValueHead(hidden_size)).to(plan.device)
    from peft import get_peft_model

    # AutoModel: the trunk without the LM head, so the critic never builds vocabulary-sized logits.
    trunk = load_causal_lm(config.ppo.critic_model or config.base_model(), plan, model_cls=AutoModel)
    trunk = get_peft_model(trunk, lora_config(config.lora, task_type="FEATURE_EXTRACTION"))
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


# --- data --------------------------------------------------------------------------------------------


def as_prompt(value: Any, where: str) -> list[Message]:
    """A prompt is a message list ending in a user (or system) turn; a bare string is one user message."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    for i, msg in enumerate(value):
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get("role"), str)
            or not isinstance(msg.get("content"), str)
        ):
            raise DataError(f"{where}: prompt[{i}] needs a string role and content")
    if value[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt's last message is the assistant's; nothing left to respond to")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_prompts(path: Path) -> list[list[Message]]:
    """Prompts from `prompt` rows, preference pairs (any shape `preference_data` reads) or SFT conversations."""
    from alignment.preference_data import to_canonical
    from alignment.sft_data import to_conversation

    prompts: list[list[Message]] = []
    for where, row in read_rows(path):
        if "chosen" in row or "rejected" in row:
            prompts.append(to_canonical(row, where)["prompt"])
        elif "prompt" in row:
            prompts.append(as_prompt(row["prompt"], where))
        elif "messages" in row or "instruction" in row:
            conversation = to_conversation(row, where)
            prompts.extend(ex["prompt"] for ex in to_prompt_completion([conversation]))
        else:
            raise DataError(
                f"{where}: row has no 'prompt', 'chosen'/'rejected' or 'messages' (keys: {sorted(row)})"
            )
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def tokenize_prompts(
    prompts: Sequence[list[Message]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[list[Message]], list[list[int]], int]:
    """Chat-template each prompt with the generation prompt; drop (and count) those over max_length."""
    kept, ids, dropped = [], [], 0
    for prompt in prompts:
        encoded = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        if len(encoded) > max_length:
            dropped += 1
            continue
        kept.append(prompt)
        ids.append(encoded)
    return kept, ids, dropped


def tokenize_ptx(
    path: Path, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """SFT conversations -> (input_ids, labels) with the prompt masked (-100): log pi(x) on responses only."""
    examples = []
    for ex in to_prompt_completion(load_conversations(path)):
        prompt_ids = _ids(
            tokenizer.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True)
        )
        full_ids = _ids(tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True))
        labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
        examples.append((full_ids[:max_length], labels[:max_length]))
    return examples


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def pad(sequences: Sequence[Sequence[int]], value: int, side: Literal["left", "right"]) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    rows = [
        ([value] * (width - len(s)) + list(s)) if side == "left" else (list(s) + [value] * (width - len(s)))
        for s in sequences
    ]
    return torch.tensor(rows, dtype=torch.long)


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


@torch.no_grad()
def generate_rollouts(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    prompts: Sequence[list[Message]],
    generation: GenerationSettings,
) -> Rollout:
    device = next(policy.parameters()).device
    query_ids = pad(prompt_ids, tokenizer.pad_token_id, "left").to(device)
    query_mask = pad([[1] * len(p) for p in prompt_ids], 0, "left").to(device)
    # top_k=0 and an explicit config: sample from exactly the distribution the logprobs describe,
    # whatever sampling defaults the checkpoint's generation_config.json carries.
    config = GenerationConfig(
        do_sample=True,
        temperature=generation.temperature,
        top_p=generation.top_p,
        top_k=0,
        max_new_tokens=generation.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    output = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
    response_ids = output[:, query_ids.shape[1] :]
    is_eos = response_ids == tokenizer.eos_token_id
    ended_with_eos = is_eos.any(dim=1)
    T = response_ids.shape[1]
    first_eos = torch.where(
        ended_with_eos, is_eos.int().argmax(dim=1), torch.full_like(ended_with_eos, T - 1, dtype=torch.long)
    )
    response_mask = (torch.arange(T, device=device)[None, :] <= first_eos[:, None]).long()
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
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


# --- phase 3: forward passes -------------------------------------------------------------------------


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what generate() used."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def forward_policy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    temperature: float,
    with_hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log pi(y_t | x, y_<t), entropy, last hidden states) for the response tokens, each (B, T[, H]).

    Logits are divided by the sampling temperature, so the logprobs are those of the sampling
    distribution; only the response positions reach the LM head (`logits_to_keep`).
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=response_length + 1,
        output_hidden_states=with_hidden,
    )
    logits = out.logits[:, :-1].float() / temperature
    targets = input_ids[:, -response_length:]
    log_z = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    with torch.no_grad():
        entropy = log_z - (logits.softmax(-1) * logits).sum(-1)
    hidden = out.hidden_states[-1][:, -response_length - 1 : -1] if with_hidden else None
    return logprobs, entropy, hidden


def critic_values(
    critic: Critic, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
) -> torch.Tensor:
    """V(s_t) for the state before each response token, from a separate critic's own trunk."""
    assert critic.trunk is not None
    out = critic.trunk(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    )
    return critic.head(out.last_hidden_state[:, -response_length - 1 : -1])


@torch.no_grad()
def rollout_logprobs_and_values(
    policy: nn.Module, critic: Critic, rollout: Rollout, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi_theta_old, log pi_ref and V_old for a rollout (three forward passes, no grad)."""
    T = rollout.response_ids.shape[1]
    ids, mask = rollout.input_ids, rollout.attention_mask
    logprobs, _, hidden = forward_policy(policy, ids, mask, T, temperature, with_hidden=critic.shared)
    with reference_policy(policy) as reference:
        ref_logprobs, _, _ = forward_policy(reference, ids, mask, T, temperature)
    values = critic.head(hidden) if critic.shared else critic_values(critic, ids, mask, T)
    return logprobs, ref_logprobs, values


# --- phase 4: advantages, then the PPO update --------------------------------------------------------


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


# --- the trainer -------------------------------------------------------------------------------------


class PPOTrainer:
    """Holds the models, optimizers and KL controller; `step(prompts)` is one rollout + PPO update."""

    def __init__(
        self,
        config: PPORunConfig,
        reward_fn: RewardFn,
        policy: nn.Module,
        critic: Critic,
        tokenizer: PreTrainedTokenizerBase,
        ptx_examples: list[tuple[list[int], list[int]]] | None = None,
        total_steps: int | None = None,
    ) -> None:
        self.config, self.ppo, self.reward_fn = config, config.ppo, reward_fn
        self.policy, self.critic, self.tokenizer = policy, critic, tokenizer
        self.device = next(policy.parameters()).device
        t = config.training
        policy_params = [p for p in policy.parameters() if p.requires_grad]
        if critic.shared:
            policy_params += list(critic.head.parameters())
        self.optimizer = torch.optim.AdamW(
            policy_params, lr=t.learning_rate, weight_decay=t.weight_decay, eps=1e-5
        )
        self.critic_optimizer = None
        if not critic.shared:
            critic_params = [p for p in critic.parameters() if p.requires_grad]
            lr = self.ppo.critic_learning_rate or t.learning_rate
            self.critic_optimizer = torch.optim.AdamW(
                critic_params, lr=lr, weight_decay=t.weight_decay, eps=1e-5
            )
        self.schedulers = [self._lr_schedule(opt, total_steps) for opt in self.optimizers]
        self.kl_ctl = kl_controller(self.ppo)
        self.score_moments = RunningMoments()
        self.ptx_examples = ptx_examples or []
        self._ptx_batches = self._cycle_ptx()
        self._ptx_used = 0  # batches drawn, so a resumed run draws the same ones next
        self.history: list[dict[str, float]] = []

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in (self.optimizer, self.critic_optimizer) if opt is not None]

    def _lr_schedule(self, optimizer: torch.optim.Optimizer, total_steps: int | None) -> Any:
        """training.lr_scheduler/warmup over all optimizer steps of the run (constant when unknown)."""
        if total_steps is None:
            return get_scheduler("constant", optimizer)
        t = self.config.training
        per_step = self.ppo.ppo_epochs * math.ceil(self.ppo.rollout_batch_size / self.ppo.mini_batch_size)
        n = total_steps * per_step
        warmup = int(t.warmup * n) if t.warmup < 1 else int(t.warmup)
        return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=n)

    # One step, phase by phase.

    def make_experience(
        self, prompts: list[list[Message]], prompt_ids: list[list[int]]
    ) -> tuple[Experience, dict[str, float]]:
        g = self.ppo.generation
        rollout = generate_rollouts(self.policy, self.tokenizer, prompt_ids, prompts, g)
        raw_scores, scores = score_rollouts(self.reward_fn, rollout, self.ppo.missing_eos_penalty)
        if self.ppo.score_norm == "running":
            self.score_moments.update(scores)
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        logprobs, ref_logprobs, values = rollout_logprobs_and_values(
            self.policy, self.critic, rollout, g.temperature
        )
        experience, stats = compute_advantages(
            rollout, scores, logprobs, ref_logprobs, values, self.kl_ctl.value, self.ppo
        )
        stats |= {
            "reward/raw": raw_scores.mean().item(),
            "reward/score": scores.mean().item(),
            "rollout/eos_fraction": rollout.ended_with_eos.float().mean().item(),
            "rollout/response_length": rollout.response_mask.sum(1).float().mean().item(),
        }
        return experience, stats

    def update(self, experience: Experience) -> dict[str, float]:
        """ppo_epochs passes over the batch in shuffled minibatches; returns the mean of each statistic."""
        totals: dict[str, list[float]] = {}
        B = experience.input_ids.shape[0]
        T = experience.response_mask.shape[1]
        temperature = self.ppo.generation.temperature
        max_grad_norm = self.config.training.max_grad_norm
        for _ in range(self.ppo.ppo_epochs):
            for rows in torch.randperm(B, device=self.device).split(self.ppo.mini_batch_size):
                mb = experience.select(rows)
                logprobs, entropy, hidden = forward_policy(
                    self.policy,
                    mb.input_ids,
                    mb.attention_mask,
                    T,
                    temperature,
                    with_hidden=self.critic.shared,
                )
                pg_loss, stats = policy_loss(
                    logprobs, mb.logprobs, mb.advantages, mb.response_mask, self.ppo.cliprange
                )
                loss = pg_loss
                stats["loss/policy"] = pg_loss.detach()
                stats["policy/entropy"] = masked_mean(entropy, mb.response_mask)
                if self.critic.shared:
                    vpred = self.critic.head(hidden)
                    vf_loss, vf_stats = value_loss(
                        vpred, mb.values, mb.returns, mb.response_mask, self.ppo.cliprange_value
                    )
                    loss = loss + self.ppo.vf_coef * vf_loss
                    stats |= vf_stats | {"loss/value": vf_loss.detach()}
                if self.ppo.ptx_coef > 0 and self.ptx_examples:
                    ptx = self.ptx_loss()
                    loss = loss + self.ppo.ptx_coef * ptx
                    stats["loss/ptx"] = ptx.detach()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                stats["policy/grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                self.optimizer.step()
                self.schedulers[0].step()
                if not self.critic.shared:
                    stats |= self.critic_step(mb, T)
                for key, value in stats.items():
                    totals.setdefault(key, []).append(float(value))
        return {key: sum(v) / len(v) for key, v in totals.items()}

    def critic_step(self, mb: Experience, response_length: int) -> dict[str, Any]:
        """One optimizer step of a separate critic: its own forward, loss and optimizer."""
        assert self.critic_optimizer is not None
        vpred = critic_values(self.critic, mb.input_ids, mb.attention_mask, response_length)
        vf_loss, stats = value_loss(vpred, mb.values, mb.returns, mb.response_mask, self.ppo.cliprange_value)
        self.critic_optimizer.zero_grad(set_to_none=True)
        vf_loss.backward()
        params = [p for group in self.critic_optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.config.training.max_grad_norm)
        self.critic_optimizer.step()
        self.schedulers[1].step()
        return stats | {"loss/value": vf_loss.detach()}

    def ptx_loss(self) -> torch.Tensor:
        """PPO-ptx (InstructGPT eq. 2): -gamma_ptx E_{x ~ D_pretrain}[log pi(x)] added to the PPO loss."""
        self._ptx_used += 1
        input_ids, attention_mask, labels = (t.to(self.device) for t in next(self._ptx_batches))
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    def _cycle_ptx(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Endless shuffled (input_ids, attention_mask, labels) batches of the ptx data, right-padded."""
        if not self.ptx_examples:
            return iter(())
        rng = random.Random(self.config.training.seed)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            while True:
                order = list(range(len(self.ptx_examples)))
                rng.shuffle(order)
                for i in range(0, len(order), self.ppo.ptx_batch_size):
                    chunk = [self.ptx_examples[j] for j in order[i : i + self.ppo.ptx_batch_size]]
                    ids = pad([c[0] for c in chunk], self.tokenizer.pad_token_id, "right")
                    # From lengths, not from ids: the pad token is often EOS, which the text itself contains.
                    attention_mask = pad([[1] * len(c[0]) for c in chunk], 0, "right")
                    labels = pad([c[1] for c in chunk], -100, "right")
                    yield ids, attention_mask, labels

        return batches()

    def step(self, prompts: list[list[Message]], prompt_ids: list[list[int]]) -> dict[str, float]:
        experience, stats = self.make_experience(prompts, prompt_ids)
        stats |= self.update(experience)
        self.kl_ctl.update(stats["objective/kl"], len(prompts))
        stats["objective/kl_coef"] = self.kl_ctl.value
        stats["policy/learning_rate"] = self.schedulers[0].get_last_lr()[0]
        self.history.append(stats)
        return stats

    def save(self, output_dir: Path) -> None:
        """Policy adapter + tokenizer at the top, value head beside it (and the critic's LoRA under critic/)."""
        output_dir.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(str(output_dir), selected_adapters=["default"])
        self.tokenizer.save_pretrained(str(output_dir))
        head_dir = output_dir
        if not self.critic.shared:
            head_dir = output_dir / CRITIC_DIR
            self.critic.trunk.save_pretrained(str(head_dir))
        head_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.critic.head.state_dict().items()},
            str(head_dir / VALUE_HEAD_FILE),
        )

    def save_checkpoint(self, checkpoint_dir: Path, step: int, sampler: dict[str, Any]) -> None:
        """Everything a resumed run needs to continue exactly where this one is after `step`.

        The weights as `save` writes them, plus optimizer and scheduler states, the KL coefficient,
        the score statistics, the history and the RNG states (sampling and prompt order), written to a
        temporary directory first and renamed, so a crash mid-save never leaves a half checkpoint.
        """
        partial = checkpoint_dir.with_name(checkpoint_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.save(partial)
        state = {
            "step": step,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [sched.state_dict() for sched in self.schedulers],
            "kl_coef": self.kl_ctl.value,
            "score_moments": (self.score_moments.mean, self.score_moments.var, self.score_moments.count),
            "history": self.history,
            "ptx_used": self._ptx_used,
            "torch_rng": torch.get_rng_state(),
            "sampler": sampler,
        }
        torch.save(state, partial / TRAINER_STATE_FILE)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        partial.rename(checkpoint_dir)

    def load_checkpoint(self, checkpoint_dir: Path) -> dict[str, Any]:
        """Restore a `save_checkpoint` directory into this trainer; returns its step and sampler state."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(
            self.policy, load_file(str(checkpoint_dir / "adapter_model.safetensors")), adapter_name="default"
        )
        head_dir = checkpoint_dir
        if not self.critic.shared:
            head_dir = checkpoint_dir / CRITIC_DIR
            set_peft_model_state_dict(
                self.critic.trunk, load_file(str(head_dir / "adapter_model.safetensors"))
            )
        self.critic.head.load_state_dict(load_file(str(head_dir / VALUE_HEAD_FILE)))
        state = torch.load(checkpoint_dir / TRAINER_STATE_FILE, weights_only=False)
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        for sched, saved in zip(self.schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(saved)
        self.kl_ctl.value = state["kl_coef"]
        self.score_moments.mean, self.score_moments.var, self.score_moments.count = state["score_moments"]
        self.history = state["history"]
        for _ in range(state["ptx_used"]):
            next(self._ptx_batches)
        self._ptx_used = state["ptx_used"]
        torch.set_rng_state(state["torch_rng"])
        return {"step": state["step"], "sampler": state["sampler"]}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest checkpoint-N in a run directory that holds a trainer state."""
    found = [
        (int(d.name.split("-")[1]), d)
        for d in run_dir.glob("checkpoint-*")
        if d.name.split("-")[1].isdigit() and (d / TRAINER_STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def load_ppo_models(run_dir: str | Path, plan: DevicePlan | None = None) -> tuple[nn.Module, Critic]:
    """Reload a finished PPO run: (policy with its adapter, critic with its value head)."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    policy = load_with_adapter(None, run_dir, plan).eval()
    critic_dir = run_dir / CRITIC_DIR
    if critic_dir.is_dir():
        trunk = load_causal_lm(adapter_base_model(critic_dir), plan, model_cls=AutoModel)
        trunk = PeftModel.from_pretrained(trunk, str(critic_dir)).eval()
        head_path = critic_dir / VALUE_HEAD_FILE
    else:
        trunk = None
        head_path = run_dir / VALUE_HEAD_FILE
    state = load_file(str(head_path))
    head = ValueHead(state["summary.weight"].shape[1])
    head.load_state_dict(state)
    device = next(policy.parameters()).device
    return policy, Critic(head, trunk).to(device)


# --- the run -----------------------------------------------------------------------------------------


def _check_supported(config: PPORunConfig) -> None:
    if config.resume and config.distributed.backend == "ray":
        raise ConfigError("ppo: resume is supported for local runs only (distributed.backend=local)")
    if config.ppo.ptx_coef > 0 and config.data.ptx is None:
        raise ConfigError("ppo.ptx_coef > 0 needs data.ptx (SFT data for the pretraining-mix loss)")
    if config.ppo.mini_batch_size > config.ppo.rollout_batch_size:
        raise ConfigError(
            f"ppo.mini_batch_size ({config.ppo.mini_batch_size}) is larger than ppo.rollout_batch_size "
            f"({config.ppo.rollout_batch_size})"
        )


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(history) + 1)
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_r.plot(steps, [h["reward/raw"] for h in history], label="reward")
    ax_r.plot(steps, [h["objective/rlhf_reward"] for h in history], label="score - beta KL")
    ax_r.set_xlabel("PPO step")
    ax_r.legend()
    ax_kl.plot(steps, [h["objective/kl"] for h in history], color="tab:red")
    ax_kl.set_xlabel("PPO step")
    ax_kl.set_ylabel("KL(pi || pi_ref), nats")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def total_steps(config: PPORunConfig, n_prompts: int) -> int:
    if config.training.max_steps > 0:
        return config.training.max_steps
    return max(1, math.ceil(config.training.epochs * n_prompts / config.ppo.rollout_batch_size))


def build_ppo_trainer(
    config: PPORunConfig, reward_fn: RewardFn
) -> tuple[PPOTrainer, list[list[Message]], list[list[int]]]:
    """Models, tokenizer and data for a run: (trainer, prompts, their token ids)."""
    _check_supported(config)
    torch.manual_seed(config.training.seed)
    plan = device_plan(config)
    tokenizer = load_policy_tokenizer(config.init_adapter, config.base_model())
    prompts, prompt_ids, dropped = tokenize_prompts(
        load_prompts(config.data.prompts), tokenizer, config.data.max_prompt_length
    )
    if not prompts:
        raise DataError(
            f"{config.data.prompts}: every prompt is longer than {config.data.max_prompt_length} tokens"
        )
    if dropped:
        log.warning("dropped %d prompts longer than %d tokens", dropped, config.data.max_prompt_length)
    ptx = tokenize_ptx(config.data.ptx, tokenizer, config.data.ptx_max_length) if config.data.ptx else None
    policy = load_policy(config, plan)
    critic = load_critic(config, plan, policy)
    trainer = PPOTrainer(config, reward_fn, policy, critic, tokenizer, ptx, total_steps(config, len(prompts)))
    return trainer, prompts, prompt_ids


def train_ppo(config: PPORunConfig, reward_fn: RewardFn) -> dict[str, Any]:
    """Run PPO and write policy adapter, value head, config, per-step log, curves and model card."""
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "prefloop-config.yaml")
    if config.distributed.backend == "ray":
        return _train_ppo_on_ray(config, reward_fn)
    trainer, prompts, prompt_ids = build_ppo_trainer(config, reward_fn)
    run = _start_wandb(config)
    steps = total_steps(config, len(prompts))
    rng = random.Random(config.training.seed)
    order: list[int] = []
    log_path = out / "ppo_log.jsonl"
    first = 1
    checkpoint = latest_checkpoint(out) if config.resume else None
    if config.resume and checkpoint is None:
        raise ConfigError(f"ppo: resume asked for, but {out} holds no checkpoint-N with a trainer state")
    if checkpoint is not None:
        restored = trainer.load_checkpoint(checkpoint)
        first = restored["step"] + 1
        rng.setstate(restored["sampler"]["rng"])
        order = restored["sampler"]["order"]
        log.info("ppo: resumed from %s (step %d of %d)", checkpoint, restored["step"], steps)
        # The log keeps the steps the checkpoint has; later lines came from the interrupted run.
        lines = log_path.read_text().splitlines() if log_path.is_file() else []
        log_path.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] < first))
    else:
        log_path.write_text("")
    columns = (
        TextColumn("[bold]PPO"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("", total=steps, completed=first - 1)
        for step in range(first, steps + 1):
            # Shuffled passes over the prompts, one rollout batch at a time.
            while len(order) < config.ppo.rollout_batch_size:
                epoch = list(range(len(prompts)))
                rng.shuffle(epoch)
                order += epoch
            batch, order = order[: config.ppo.rollout_batch_size], order[config.ppo.rollout_batch_size :]
            stats = trainer.step([prompts[i] for i in batch], [prompt_ids[i] for i in batch])
            with log_path.open("a") as fh:
                fh.write(json.dumps({"step": step, **stats}) + "\n")
            if run is not None:
                run.log(stats, step=step)
            progress.update(
                task,
                advance=1,
                description=f"reward {stats['reward/raw']:.3f}  kl {stats['objective/kl']:.3f}  beta {trainer.kl_ctl.value:.3g}",
            )
            save_every = config.training.save_steps
            if save_every and step % save_every == 0 and step < steps:
                sampler = {"rng": rng.getstate(), "order": order}
                trainer.save_checkpoint(out / f"checkpoint-{step}", step, sampler)
    trainer.save(out)
    plot_curves(trainer.history, out / "ppo_curves.png")
    metrics = _summary(trainer.history, len(prompts))
    if run is not None:
        run.summary.update(metrics)
        run.finish()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    data = [p for p in (config.data.prompts, config.data.ptx) if p]
    write_model_card(out, "ppo", config, data_fingerprint(data), metrics)
    return metrics


def _train_ppo_on_ray(config: PPORunConfig, reward_fn: RewardFn) -> dict[str, Any]:
    """Data-parallel PPO on Ray workers; the run dir ends up as a local run leaves it."""
    from alignment.distributed import run_ppo_on_ray

    _check_supported(config)
    history, ray_metrics = run_ppo_on_ray(config, reward_fn)
    out = config.output_dir
    plot_curves(history, out / "ppo_curves.png")
    data = [p for p in (config.data.prompts, config.data.ptx) if p]
    metrics = {**_summary(history, len(load_prompts(config.data.prompts))), **ray_metrics}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_model_card(out, "ppo", config, data_fingerprint(data), metrics)
    return metrics


def _summary(history: list[dict[str, float]], n_prompts: int) -> dict[str, Any]:
    k = max(1, len(history) // 4)
    first, last = history[:k], history[-k:]

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {
        "steps": len(history),
        "prompts": n_prompts,
        "reward_first": mean(first, "reward/raw"),
        "reward_last": mean(last, "reward/raw"),
        "kl_last": mean(last, "objective/kl"),
        "kl_coef": history[-1]["objective/kl_coef"],
        "eos_fraction_last": mean(last, "rollout/eos_fraction"),
        "response_length_last": mean(last, "rollout/response_length"),
    }


def _start_wandb(config: PPORunConfig) -> Any:
    if config.tracking.report_to != "wandb":
        return None
    setup_tracking(config.tracking, config.output_dir)
    import wandb

    return wandb.init(
        project=config.tracking.project,
        name=config.tracking.run_name or config.output_dir.name,
        config=config.model_dump(mode="json"),
        dir=str(config.output_dir),
        mode=config.tracking.wandb_mode,
    )
