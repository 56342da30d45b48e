"""Local training (SFT, DPO, KTO, reward, PPO) SIGKILLed mid-run resumes from its last complete checkpoint and ends at the same step.

A child process trains tiny-random with a checkpoint every 2 steps; once a checkpoint exists it is
SIGKILLed (no cleanup, no final save), and a torn checkpoint with a higher step is left beside the
real ones, as a kill during a save would. `resume=true` must pick the last complete checkpoint
(HF, and prefloop's PPO, log the step they resume from), skip the torn one, and finish at `max_steps`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.checkpoints import PPO_TRAINER_STATE, checkpoint_step, latest_checkpoint
from alignment.data_files import write_jsonl
from alignment.preference_data import EXAMPLE_PREFERENCES, load_preference_rows
from alignment.sft import EXAMPLE_DATA

pytestmark = pytest.mark.slow

MAX_STEPS, SAVE_STEPS = 12, 2

TRAIN = """
import json, sys
from alignment.config import load_config
stage, overrides = sys.argv[1], json.loads(sys.argv[2])
if stage == "sft":
    from alignment.sft import SFTRunConfig as Config, train_sft as train
elif stage == "dpo":
    from alignment.dpo import DPORunConfig as Config, train_dpo as train
elif stage == "kto":
    from alignment.kto import KTORunConfig as Config, train_kto as train
elif stage == "ppo":
    import logging, time
    from alignment.rl.config import PPORunConfig as Config
    from alignment.rl.ppo import train_ppo
    logging.basicConfig(level=logging.INFO)  # the "ppo: resumed from" line

    def reward(prompts, responses):
        time.sleep(0.3)  # a reward server's latency: keeps a step longer than the kill's polling
        return [float(len(r) < 12) for r in responses]

    def train(config):
        return train_ppo(config, reward)
else:
    from reward.trainer import RewardRunConfig as Config, train_reward as train
train(load_config(Config, None, overrides))
"""


def _child(stage: str, overrides: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "info", "WANDB_MODE": "offline"}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", TRAIN, stage, json.dumps(overrides)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _overrides(stage: str, tiny_model: Path, tmp_path: Path) -> list[str]:
    common = [
        f"model={tiny_model}",
        f"output_dir={tmp_path / 'run'}",
        f"training.max_steps={MAX_STEPS}",
        f"training.save_steps={SAVE_STEPS}",
        "training.save_total_limit=3",
        "training.batch_size=4",
        "training.logging_steps=2",
        "tracking.report_to=none",
    ]
    if stage == "sft":
        train = tmp_path / "sft.jsonl"
        train.write_text("".join(EXAMPLE_DATA.read_text().splitlines(keepends=True)[:64]))
        return [*common, f"data.train={train}", "data.eval_fraction=0.0", "data.max_length=64"]
    rows = load_preference_rows(EXAMPLE_PREFERENCES)
    write_jsonl(tmp_path / "pairs.jsonl", rows[:48])
    pairs = [
        *common,
        f"data.train={tmp_path / 'pairs.jsonl'}",
        "data.eval_fraction=0.0",
        "data.max_length=96",
    ]
    return [*pairs, f"dpo.reference_cache_dir={tmp_path / 'ref-cache'}"] if stage == "dpo" else pairs


@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "reward"])
def test_a_sigkilled_run_resumes_from_its_last_complete_checkpoint(
    stage: str, tiny_model: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    overrides = _overrides(stage, tiny_model, tmp_path)
    child = _child(stage, overrides, tmp_path / "first.log")
    deadline = time.monotonic() + 600
    while (latest_checkpoint(run) is None or checkpoint_step(latest_checkpoint(run)) < 2 * SAVE_STEPS) and (
        child.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    last = latest_checkpoint(run)
    assert last is not None and not (run / "metrics.json").exists()  # killed before the end
    killed_at = checkpoint_step(last)
    assert killed_at < MAX_STEPS
    # a save cut short: the directory and weights exist, trainer_state.json is torn
    torn = run / f"checkpoint-{killed_at + 1}"
    torn.mkdir(exist_ok=True)
    (torn / "trainer_state.json").write_text('{"global_step": ')

    resumed = _child(stage, [*overrides, "resume=true"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=900) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    steps = [
        int(s)
        for s in re.findall(r"Resuming training from checkpoint with epoch \d+ and global step (\d+)", log)
    ]
    assert steps == [killed_at]  # the last complete checkpoint, not the torn one above it
    final = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())  # type: ignore[operator]
    assert final["global_step"] == MAX_STEPS and checkpoint_step(latest_checkpoint(run)) == MAX_STEPS
    assert (run / "metrics.json").is_file() and (run / "adapter_config.json").is_file()


PPO_STEPS = 6


def _ppo_overrides(tiny_model: Path, tmp_path: Path, out: Path) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    topics = ["cats", "rain", "tea", "maps", "ships", "bread"]
    write_jsonl(prompts, [{"prompt": f"Question {i}: tell me about {t}."} for i, t in enumerate(topics * 2)])
    return [
        f"model={tiny_model}",
        f"output_dir={out}",
        f"data.prompts={prompts}",
        "tracking.report_to=none",
        "training.dtype=fp32",
        f"training.max_steps={PPO_STEPS}",
        f"training.save_steps={SAVE_STEPS}",
        "ppo.critic=separate",
        "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=1",
        "ppo.generation.max_new_tokens=4",
    ]


def test_a_sigkilled_ppo_run_resumes_from_its_last_complete_checkpoint(
    tiny_model: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    overrides = _ppo_overrides(tiny_model, tmp_path, run)
    straight = _child(
        "ppo", _ppo_overrides(tiny_model, tmp_path, tmp_path / "straight"), tmp_path / "straight.log"
    )
    child = _child("ppo", overrides, tmp_path / "first.log")
    deadline = time.monotonic() + 600
    while (
        latest_checkpoint(run, PPO_TRAINER_STATE) is None
        and child.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    last = latest_checkpoint(run, PPO_TRAINER_STATE)
    assert last is not None and not (run / "metrics.json").exists()  # killed before the end
    killed_at = checkpoint_step(last)
    assert killed_at is not None and killed_at < PPO_STEPS
    # saves cut short: a checkpoint dir with weights but no trainer state (as a copy or sync
    # interrupted midway leaves), and a full-looking `.partial` that was never renamed into place
    torn = run / f"checkpoint-{killed_at + 1}"
    torn.mkdir(exist_ok=True)
    (torn / "adapter_model.safetensors").write_bytes(os.urandom(64))
    partial = run / f"checkpoint-{killed_at + 2}.partial"
    partial.mkdir(exist_ok=True)
    (partial / PPO_TRAINER_STATE).write_bytes(os.urandom(64))

    resumed = _child("ppo", [*overrides, "resume=true"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=900) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    log = (tmp_path / "resumed.log").read_text()
    steps = [int(s) for s in re.findall(rf"ppo: resumed from \S+ \(step (\d+) of {PPO_STEPS}\)", log)]
    assert steps == [killed_at]  # the last complete checkpoint, not the torn ones above it
    logged = [json.loads(line)["step"] for line in (run / "ppo_log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, PPO_STEPS + 1))
    assert (run / "metrics.json").is_file() and (run / "adapter_model.safetensors").is_file()
    # the kill cost nothing: same weights as the run that was never interrupted
    assert straight.wait(timeout=900) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    for name in (
        "adapter_model.safetensors",
        "critic/adapter_model.safetensors",
        "critic/value_head.safetensors",
    ):
        assert (run / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
