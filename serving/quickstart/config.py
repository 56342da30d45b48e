"""`prefloop quickstart` configuration: configs/quickstart.yaml validates against `QuickstartConfig`.

The file holds the default profile; `profiles.<name>` (e.g. `small`, for CI) is a set of dotted
overrides applied on top, then the command line's `--set key=value`. Each training stage starts from
its own shipped config (configs/sft.yaml, reward.yaml, dpo.yaml, ...) with the mapping given here
set on it, so the quickstart never forks a trainer's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from alignment.config import ConfigError, StrictModel, _read_yaml, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
QUICKSTART_FILE = CONFIGS / "quickstart.yaml"
BUNDLED_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"


class PromptSettings(StrictModel):
    file: Path | None = Field(None, description="Prompt JSONL (id, prompt); default: the bundled set.")
    heldout_fraction: float = Field(0.3, gt=0, lt=1, description="Share of prompts held out, by hashed id.")
    train_prompts: int = Field(120, ge=1, description="Train prompts used (first N of the split).")
    heldout_prompts: int = Field(100, ge=1, description="Held-out prompts the win rates are measured on.")

    def path(self) -> Path:
        return self.file or BUNDLED_PROMPTS


class SamplingSettings(StrictModel):
    num_samples: int = Field(3, ge=2, description="SFT responses per train prompt.")
    max_pairs_per_prompt: int = Field(2, ge=1)
    temperature: float = Field(1.0, gt=0, description="~1: diverse enough that pairs differ.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(24, ge=1)
    seed: int = 0


class AnnotationSettings(StrictModel):
    mode: Literal["simulated", "human"] = "simulated"
    dataset: str = Field("quickstart", description="Argilla dataset name (workspace: prefloop).")
    votes_per_record: int = Field(2, ge=1, le=3, description="Overlap: annotators voting on each record.")
    human_records: int = Field(20, ge=1, description="--human: completed records to wait for.")
    flip_rate: float = Field(0.15, ge=0, le=1, description="The noisy annotator flips this share of votes.")
    position_bias: float = Field(0.6, ge=0, le=1, description="Near-ties the biased annotator gives to A.")
    shorter_bias: float = Field(0.6, ge=0, le=1, description="Near-ties given to the shorter reply.")
    near_tie: float = Field(1.0, ge=0, description="Rubric points within which a bias takes over.")
    seed: int = 0


class EvalSettings(StrictModel):
    temperature: float = Field(0.7, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(24, ge=1)
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples of the win-rate interval.")
    seed: int = 0


class ServeSettings(StrictModel):
    requests: int = Field(24, ge=3, description="Chat requests sent through the openai client.")
    n2_every: int = Field(3, ge=1, description="Every n-th request asks for n=2 (pairwise feedback).")
    max_tokens: int = Field(64, ge=1)
    seed: int = Field(
        0, description="Request i sends seed + i (OpenAI `seed`): the same traffic on every run."
    )
    loop_train: dict[str, Any] = Field(
        default_factory=dict, description="Set on configs/dpo.yaml for the loop's retrain."
    )


class QuickstartConfig(StrictModel):
    model: str = Field("smollm2-135m-instruct", description="Embedded name, local path or hub id.")
    output_dir: Path = Path("runs/quickstart")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    rubric: Path = CONFIGS / "rubric.yaml"
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    annotation: AnnotationSettings = Field(default_factory=AnnotationSettings)
    sft: dict[str, Any] = Field(default_factory=dict, description="Set on configs/sft.yaml.")
    reward: dict[str, Any] = Field(default_factory=dict, description="Set on configs/reward.yaml.")
    dpo: dict[str, Any] = Field(default_factory=dict, description="Set on configs/dpo.yaml.")
    algorithm: Literal["dpo", "ppo", "grpo"] = "dpo"
    rl: dict[str, Any] = Field(
        default_factory=dict, description="Set on both configs/ppo.yaml and grpo.yaml (--algorithm ppo|grpo)."
    )
    ppo: dict[str, Any] = Field(
        default_factory=dict, description="Set on configs/ppo.yaml after `rl`: the quickstart's PPO budget."
    )
    grpo: dict[str, Any] = Field(
        default_factory=dict, description="Set on configs/grpo.yaml after `rl`: the quickstart's GRPO budget."
    )
    eval: EvalSettings = Field(default_factory=EvalSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    profiles: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Named sets of dotted overrides (e.g. small)."
    )


def flatten(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    """{'training': {'epochs': 2}} -> ['training.epochs=2'] (values as JSON, which YAML reads back)."""
    import json

    out = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += flatten(value, f"{dotted}.")
        else:
            out.append(f"{dotted}={value if isinstance(value, str) else json.dumps(value)}")
    return out


def load_quickstart_config(
    path: str | Path | None = None, profile: str = "default", overrides: list[str] | None = None
) -> QuickstartConfig:
    path = Path(path) if path else QUICKSTART_FILE
    profiles = _read_yaml(path).get("profiles") or {}
    if profile != "default" and profile not in profiles:
        raise ConfigError(f"{path}: no profile {profile!r} (have: default, {', '.join(profiles)})")
    chosen = profiles.get(profile, {}) if profile != "default" else {}
    profile_sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in chosen.items()]
    profile_sets = [s.removesuffix("\n...") for s in profile_sets]
    return load_config(QuickstartConfig, path, [*profile_sets, *(overrides or [])])
