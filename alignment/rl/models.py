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
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel

from alignment.devices import DevicePlan
from alignment.models import adapter_base_model, check_adapter, load_causal_lm, load_with_adapter
from alignment.policy import load_run_policy
from alignment.rl.config import PPORunConfig
from alignment.runner import lora_config

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
    # No dropout anywhere: it would make pi_theta / pi_theta_old != 1 before any update (N+ details).
    return policy.eval()


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
