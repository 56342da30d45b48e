"""Reinforcement learning from a reward: PPO (prefloop's own) and GRPO/RLOO (TRL's), split by role.

    config.py        run configs and hyperparameters of every RL stage, and the RewardFn type
    losses.py        the PPO objective as pure tensor functions, each with its paper's equation
    models.py        value head, critic, reference policy, and the forward passes PPO needs
    data.py          prompt and PPO-ptx tokenisation, padding
    experience.py    one rollout batch: generate, score, old logprobs/values, advantages
    ppo_trainer.py   PPOTrainer (update, checkpointing) and building one from a config
    ppo.py           `train_ppo`: the run loop, curves, tracking, model card
    ray_worker.py    data-parallel PPO on Ray workers
    grpo.py          `train_grpo`: GRPO/RLOO through TRL

A trainer takes its reward as a scoring callable (`RewardFn`), so nothing here imports `reward/`.
"""
