"""PPOTrainer: one PPO step is a rollout batch turned into experience, then epochs of clipped updates.

trainer, prompts, prompt_ids = build_ppo_trainer(config, reward_fn)
stats = trainer.step(prompts[:16], prompt_ids[:16])

The trainer holds the models, their optimizers and LR schedules, the KL controller and the score
statistics, and saves them: `save` writes what a finished run keeps (policy adapter, tokenizer,
value head, critic LoRA; safetensors), `save_checkpoint` adds what a resumed run needs (optimizer
and scheduler states, KL coefficient, history, RNG and prompt-sampler states) in a trainer-state file
of plain tensors and numbers, read back with `torch.load(weights_only=True)`: never a pickle.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase, get_scheduler

from alignment.checkpoints import PPO_TRAINER_STATE
from alignment.config import ConfigError
from alignment.data_files import DataError
from alignment.generation import Engine
from alignment.lora_precision import FP32MasterWeights
from alignment.messages import Message
from alignment.policy import load_run_tokenizer
from alignment.prompts import load_prompts
from alignment.rl.config import PPOConfig, PPORunConfig, RewardFn
from alignment.rl.data import pad, tokenize_prompts, tokenize_ptx
from alignment.rl.experience import (
    Experience,
    Rollout,
    compute_advantages,
    generate_rollouts,
    old_values,
    policy_logprobs_and_values,
    reference_logprobs,
    rollout_engine,
    rollout_logprobs_and_values,
    score_rollouts,
)
from alignment.rl.losses import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    masked_mean,
    policy_loss,
    value_loss,
)
from alignment.rl.models import (
    CRITIC_DIR,
    VALUE_HEAD_FILE,
    Critic,
    PackedRollouts,
    critic_values,
    forward_policy,
    load_critic,
    load_policy,
    pack_rollouts,
)
from alignment.runner import device_plan

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = PPO_TRAINER_STATE  # checkpoint-N/: optimizers, schedulers, KL, RNG, sampler


def kl_controller(config: PPOConfig) -> FixedKLController | AdaptiveKLController:
    if config.kl_controller == "fixed":
        return FixedKLController(config.init_kl_coef)
    return AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)


@dataclass
class ScoredRollout:
    """A rollout batch scored, with its reference log-probs: old log-probs and values still to come."""

    rollout: Rollout
    scores: torch.Tensor  # (B,) after the EOS penalty and normalisation
    ref_logprobs: torch.Tensor  # (B, T)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.rollout.input_ids


@dataclass
class MinibatchPass:
    """A minibatch's forward passes with grad: the policy's, and the critic's values once run."""

    packed: PackedRollouts
    logprobs: torch.Tensor
    entropy: torch.Tensor
    hidden: torch.Tensor | None
    values: torch.Tensor | None = None


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
        # PyTorch's fused AdamW where it has one (CPU, CUDA); CPU's default is a Python loop over the
        # ~420 LoRA tensors: 30 -> 22 ms per optimizer step with the fp32 masters (8 steps a PPO step).
        fused = self.device.type in ("cpu", "cuda") or None
        self.optimizer = torch.optim.AdamW(
            policy_params, lr=t.learning_rate, weight_decay=t.weight_decay, eps=1e-5, fused=fused
        )
        self.critic_optimizer = None
        if not critic.shared:
            critic_params = [p for p in critic.parameters() if p.requires_grad]
            lr = self.ppo.critic_learning_rate or t.learning_rate
            self.critic_optimizer = torch.optim.AdamW(
                critic_params, lr=lr, weight_decay=t.weight_decay, eps=1e-5, fused=fused
            )
        self.schedulers = [self._lr_schedule(opt, total_steps) for opt in self.optimizers]
        # bf16 trainable weights (`adapters_in_model_dtype`) are stepped as fp32 masters, so updates
        # below bf16's resolution still accumulate; fp32 weights pass through unchanged.
        self.masters = [FP32MasterWeights() for _ in self.optimizers]
        for masters, opt in zip(self.masters, self.optimizers, strict=True):
            masters.on_train_begin(None, None, None, optimizer=opt)
        self.kl_ctl = kl_controller(self.ppo)
        self.score_moments = RunningMoments()
        self.ptx_examples = ptx_examples or []
        self._ptx_batches = self._cycle_ptx()
        self._ptx_used = 0  # batches drawn, so a resumed run draws the same ones next
        self.history: list[dict[str, float]] = []
        self.engine: Engine | None = None

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

    def sample(
        self, prompts: list[list[Message]], prompt_ids: list[list[int]]
    ) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
        """Rollouts from the current policy and their (normalised) scores."""
        g = self.ppo.generation
        if self.engine is None:  # one engine (and KV cache) for the whole run
            self.engine = rollout_engine(self.policy, self.tokenizer, self.ppo.rollout_batch_size)
        rollout = generate_rollouts(self.policy, self.tokenizer, prompt_ids, prompts, g, self.engine)
        raw_scores, scores = score_rollouts(self.reward_fn, rollout, self.ppo.missing_eos_penalty)
        if self.ppo.score_norm == "running":
            self.score_moments.update(scores)
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        stats = {
            "reward/raw": raw_scores.mean().item(),
            "reward/score": scores.mean().item(),
            "rollout/eos_fraction": rollout.ended_with_eos.float().mean().item(),
            "rollout/response_length": rollout.response_mask.sum(1).float().mean().item(),
        }
        return rollout, scores, stats

    def make_experience(
        self, prompts: list[list[Message]], prompt_ids: list[list[int]]
    ) -> tuple[Experience, dict[str, float]]:
        """A rollout batch with all its no-grad passes done (`step` saves one minibatch's instead)."""
        rollout, scores, stats = self.sample(prompts, prompt_ids)
        logprobs, ref_logprobs, values = rollout_logprobs_and_values(
            self.policy, self.critic, rollout, self.ppo.generation.temperature
        )
        experience, adv_stats = compute_advantages(
            rollout, scores, logprobs, ref_logprobs, values, self.kl_ctl.value, self.ppo
        )
        return experience, stats | adv_stats

    def update(self, experience: Experience | ScoredRollout) -> dict[str, float]:
        """ppo_epochs passes over the batch in shuffled minibatches; returns the mean of each statistic.

        Given a `ScoredRollout` (old log-probs and values not computed yet), the first minibatch's
        policy forward serves as its no-grad pass too: with the parameters not yet stepped they are
        the same numbers, so that pass (half the batch's policy rows on the bench) is saved; the
        statistics of `compute_advantages` are returned with the update's.
        """
        B = experience.input_ids.shape[0]
        # Every epoch's order drawn first: the same draws of the generator as one per epoch.
        orders = [
            torch.randperm(B, device=self.device).split(self.ppo.mini_batch_size)
            for _ in range(self.ppo.ppo_epochs)
        ]
        totals: dict[str, list[float]] = {}
        first: MinibatchPass | None = None
        adv_stats: dict[str, float] = {}
        if isinstance(experience, ScoredRollout):
            experience, adv_stats, first = self._experience_from_first_minibatch(experience, orders[0][0])
        T = experience.response_mask.shape[1]
        for epoch, order in enumerate(orders):
            for i, rows in enumerate(order):
                mb = experience.select(rows)
                stats = self._minibatch_step(mb, T, first if epoch == 0 and i == 0 else None)
                for key, value in stats.items():
                    totals.setdefault(key, []).append(float(value))
        return adv_stats | {key: sum(v) / len(v) for key, v in totals.items()}

    def _policy_pass(self, mb_ids: torch.Tensor, mb_mask: torch.Tensor, T: int) -> MinibatchPass:
        """The policy's (and a separate critic's) forward with grad on a minibatch's rows."""
        packed = pack_rollouts(mb_ids, mb_mask, T)  # policy and critic alike
        logprobs, entropy, hidden = forward_policy(
            self.policy,
            mb_ids,
            mb_mask,
            T,
            self.ppo.generation.temperature,
            with_hidden=self.critic.shared,
            rollouts=packed,
        )
        return MinibatchPass(packed, logprobs, entropy, hidden)

    def _experience_from_first_minibatch(
        self, scored: ScoredRollout, rows: torch.Tensor
    ) -> tuple[Experience, dict[str, float], MinibatchPass]:
        """Experience whose old log-probs at `rows` (and a shared critic's values) come from their
        training forward."""
        rollout = scored.rollout
        ids, mask = rollout.input_ids, rollout.attention_mask
        B, T = rollout.response_ids.shape
        temperature = self.ppo.generation.temperature
        rest = torch.ones(B, dtype=torch.bool, device=self.device)
        rest[rows] = False
        rest_rows = rest.nonzero().squeeze(1)
        # The no-grad passes first, so no graph is held meanwhile; a separate critic's values of
        # every row among them: holding its graph too beside the policy's cost ~450 MiB of peak RSS.
        rest_out = None
        if len(rest_rows):
            rest_out = policy_logprobs_and_values(
                self.policy, self.critic, ids[rest_rows], mask[rest_rows], T, temperature, values=False
            )
        values = None if self.critic.shared else old_values(self.critic, ids, mask, T)
        first = self._policy_pass(ids[rows], mask[rows], T)
        logprobs = first.logprobs.detach().new_zeros(B, T)
        logprobs[rows] = first.logprobs.detach()
        if rest_out is not None:
            logprobs[rest_rows] = rest_out[0]
        if self.critic.shared:
            first.values = self.critic.head(first.hidden)
            values = first.values.detach().new_zeros(B, T)
            values[rows] = first.values.detach()
            if rest_out is not None:
                values[rest_rows] = rest_out[1]
        experience, stats = compute_advantages(
            rollout, scored.scores, logprobs, scored.ref_logprobs, values, self.kl_ctl.value, self.ppo
        )
        return experience, stats, first

    def _minibatch_step(self, mb: Experience, T: int, done: MinibatchPass | None) -> dict[str, Any]:
        """One minibatch's losses and optimizer steps; `done`: its forward passes, already run."""
        fwd = done or self._policy_pass(mb.input_ids, mb.attention_mask, T)
        pg_loss, stats = policy_loss(
            fwd.logprobs, mb.logprobs, mb.advantages, mb.response_mask, self.ppo.cliprange
        )
        loss = pg_loss
        stats["loss/policy"] = pg_loss.detach()
        stats["policy/entropy"] = masked_mean(fwd.entropy, mb.response_mask)
        if self.critic.shared:
            vpred = fwd.values if fwd.values is not None else self.critic.head(fwd.hidden)
            vf_loss, vf_stats = value_loss(
                vpred, mb.values, mb.returns, mb.response_mask, self.ppo.cliprange_value
            )
            loss = loss + self.ppo.vf_coef * vf_loss
            stats |= vf_stats | {"loss/value": vf_loss.detach()}
        if self.ppo.ptx_coef > 0 and self.ptx_examples:
            ptx = self.ptx_loss()
            loss = loss + self.ppo.ptx_coef * ptx
            stats["loss/ptx"] = ptx.detach()
        loss.backward()
        stats["policy/grad_norm"] = self._optimizer_step(0, self.config.training.max_grad_norm)
        if not self.critic.shared:
            stats |= self.critic_step(mb, T, fwd.packed)
        return stats

    def critic_step(
        self, mb: Experience, response_length: int, packed: PackedRollouts | None = None
    ) -> dict[str, Any]:
        """One optimizer step of a separate critic: its own forward, loss and optimizer."""
        assert self.critic_optimizer is not None
        vpred = critic_values(self.critic, mb.input_ids, mb.attention_mask, response_length, packed)
        vf_loss, stats = value_loss(vpred, mb.values, mb.returns, mb.response_mask, self.ppo.cliprange_value)
        vf_loss.backward()
        self._optimizer_step(1, self.config.training.max_grad_norm)
        return stats | {"loss/value": vf_loss.detach()}

    def _optimizer_step(self, which: int, max_grad_norm: float) -> torch.Tensor:
        """Gradients into the fp32 masters, clip, step, masters rounded back into the model; grads cleared."""
        optimizer, masters = self.optimizers[which], self.masters[which]
        masters.on_pre_optimizer_step(None, None, None)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        masters.on_optimizer_step(None, None, None)
        optimizer.zero_grad(set_to_none=True)
        for param, _ in masters.pairs:
            param.grad = None
        self.schedulers[which].step()
        return grad_norm

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
        rollout, scores, stats = self.sample(prompts, prompt_ids)
        ref_logprobs = reference_logprobs(self.policy, rollout, self.ppo.generation.temperature)
        stats |= self.update(ScoredRollout(rollout, scores, ref_logprobs))
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
            "masters": [[master.detach() for _, master in m.pairs] for m in self.masters],
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
        """Restore a `save_checkpoint` directory into this trainer; returns its step and sampler state.

        The trainer state is read first and with `weights_only=True`: a file holding anything but
        tensors and plain containers (a pickled object that would run code) is refused before any
        weight of this trainer is touched.
        """
        from peft import set_peft_model_state_dict

        state = torch.load(checkpoint_dir / TRAINER_STATE_FILE, weights_only=True)
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
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        saved_masters = state.get("masters")
        with torch.no_grad():  # the saved adapter is the masters rounded to bf16: take the masters themselves
            for i, masters in enumerate(self.masters):
                for j, (param, master) in enumerate(masters.pairs):
                    master.copy_(saved_masters[i][j] if saved_masters else param)
                    param.copy_(master)
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


# --- building a trainer from a config -----------------------------------------------------------


def check_supported(config: PPORunConfig) -> None:
    if config.resume and config.distributed.backend == "ray":
        raise ConfigError("ppo: resume is supported for local runs only (distributed.backend=local)")
    if config.ppo.ptx_coef > 0 and config.data.ptx is None:
        raise ConfigError("ppo.ptx_coef > 0 needs data.ptx (SFT data for the pretraining-mix loss)")
    if config.ppo.mini_batch_size > config.ppo.rollout_batch_size:
        raise ConfigError(
            f"ppo.mini_batch_size ({config.ppo.mini_batch_size}) is larger than ppo.rollout_batch_size "
            f"({config.ppo.rollout_batch_size})"
        )


def total_steps(config: PPORunConfig, n_prompts: int) -> int:
    if config.training.max_steps > 0:
        return config.training.max_steps
    return max(1, math.ceil(config.training.epochs * n_prompts / config.ppo.rollout_batch_size))


def build_ppo_trainer(
    config: PPORunConfig, reward_fn: RewardFn
) -> tuple[PPOTrainer, list[list[Message]], list[list[int]]]:
    """Models, tokenizer and data for a run: (trainer, prompts, their token ids)."""
    check_supported(config)
    torch.manual_seed(config.training.seed)
    plan = device_plan(config)
    tokenizer = load_run_tokenizer(config)
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
