"""The PPO objective for RLHF as pure tensor functions: statistics, KL control, rewards, GAE, losses.

Nothing here knows a model or a tokenizer; every function takes (B, T) tensors over response tokens
with a 0/1 `mask`, so each can be checked against a hand computation. Variable names follow the
papers:

- PPO: Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
- GAE: Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
  arXiv:1506.02438.
- KL penalty and its adaptive controller: Ziegler et al., "Fine-Tuning Language Models from Human
  Preferences", arXiv:1909.08593.
- The RLHF details (per-token KL, score on the EOS token, whitening, value clipping): Huang et al.,
  "The N+ Implementation Details of RLHF with PPO", arXiv:2403.17031.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

# --- masked statistics ------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x m) / sum(m), over everything or along `dim`; an all-masked row gives 0, not NaN."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the unmasked entries: sum(m (x - mean)^2) / (n - 1)."""
    mean = masked_mean(values, mask)
    n = mask.sum()
    # Bessel's correction, as in the reference implementations.
    return masked_mean((values - mean) ** 2, mask) * n / (n - 1).clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries; without shift_mean the mean is kept (reward whitening).

    Advantage whitening (arXiv:2403.17031) normalises A to mean 0, std 1 per batch;
    reward whitening only rescales, since shifting r would change what the policy is paid for.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


class RunningMoments:
    """Running mean and std of reward scores (Chan et al.'s parallel update), for score normalisation.

    For a new batch of n values with mean m_b and variance v_b:
    delta = m_b - mean,  N' = N + n,  mean' = mean + delta n / N',
    var' = (var N + v_b n + delta^2 N n / N') / N'.
    """

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


# --- KL controllers (arXiv:1909.08593, section 2.2) -------------------------------------------------


class FixedKLController:
    """beta_t = beta_0 for every step."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """beta_{t+1} = beta_t (1 + K_beta e_t),  e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),  K_beta = n / horizon.

    A proportional controller: beta grows while the policy's KL to the reference is above the target
    and shrinks while it is below, by at most 20% of n / horizon per update of n rollouts.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


# --- rewards and advantages -------------------------------------------------------------------------


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: Literal["k1", "k3"] | str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta KL_t at every response token, plus the score r(x, y) on the last one (the EOS).

    R(x, y) = r(x, y) - beta log(pi(y|x) / pi_ref(y|x))  (arXiv:1909.08593, section 2.2), spread over
    the tokens as in arXiv:2403.17031. KL_t is k1 = log pi/pi_ref (unbiased) or
    k3 = (pi_ref/pi - 1) - log(pi_ref/pi) (non-negative, lower variance).
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
    """Generalized advantage estimation (arXiv:1506.02438, eq. 16).

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


# --- the losses -------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L^CLIP = -E[min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)],  ratio = pi_theta / pi_theta_old.

    arXiv:1707.06347, eq. 7, averaged over the response tokens. Also returns the clip fraction, the
    approximate KL 1/2 E[(log ratio)^2] to the rollout policy, and the mean ratio.
    """
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
    """L^V = 1/2 E[max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)].

    The clipped value loss of the PPO reference code, as used for RLHF (arXiv:2403.17031).
    """
    vpredclipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (vpred - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        stats = {"value/clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask)}
    return vf_loss, stats
