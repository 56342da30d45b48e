"""Configs for `prefloop serve` (ServeConfig) and `prefloop loop` (LoopConfig)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from alignment.config import StrictModel
from alignment.devices import DTypeName
from alignment.models import DEFAULT_MODEL


class BatchingSettings(StrictModel):
    max_batch_size: int = Field(16, ge=1, description="Most rows (requests x n) in one generate call.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the first request waits for others to join.")


class LimitSettings(StrictModel):
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Larger bodies get 413.")
    max_messages: int = Field(64, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_tokens: int = Field(1024, ge=1, description="Upper bound for a request's max_tokens.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when the request gives none.")
    max_n: int = Field(8, ge=1)
    max_stop: int = Field(4, ge=0, description="Most stop sequences per request (OpenAI allows 4).")
    max_comment_chars: int = Field(4000, ge=1)
    requests_per_minute: int = Field(600, ge=0, description="Per API key; 0 = unlimited.")


class AuthSettings(StrictModel):
    api_keys: list[str] = Field(
        default_factory=list,
        description="Client bearer keys; also read from $PREFLOOP_API_KEYS (comma-separated).",
    )
    admin_key: str | None = Field(None, description="Admin bearer key; also read from $PREFLOOP_ADMIN_KEY.")
    allow_anonymous: bool = Field(False, description="Serve clients without a key (local development only).")

    def client_keys(self) -> set[str]:
        env = os.environ.get("PREFLOOP_API_KEYS", "")
        return {k for k in [*self.api_keys, *env.split(",")] if k.strip()}

    def admin(self) -> str | None:
        return os.environ.get("PREFLOOP_ADMIN_KEY") or self.admin_key


class ServeConfig(StrictModel):
    model: str = Field(DEFAULT_MODEL, description="Base model: embedded name, local path or hub id.")
    served_name: str | None = Field(
        None, description="Name of the base model in /v1/models (default: model)."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Extra adapters to load: name -> path."
    )
    store_url: str | None = Field(
        None, description="SQLAlchemy URL; default SQLite in $PREFLOOP_HOME/serving."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    dtype: DTypeName = "auto"
    threads: int | None = Field(
        None, ge=1, description="CPU threads for generation (default: torch's choice)."
    )
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)


class TriggerSettings(StrictModel):
    min_new_pairs: int = Field(64, ge=1, description="Retrain once this many new preference pairs arrived.")
    every_minutes: float | None = Field(
        None, gt=0, description="Schedule: also retrain after this long if there is any new data."
    )
    poll_seconds: float = Field(60.0, gt=0, description="How often `loop run --watch` checks the trigger.")


class IngestSettings(StrictModel):
    output_dir: Path = Field(
        Path("data/feedback"), description="Versioned datasets go to <output_dir>/vNNNN/."
    )
    min_rating_gap: int = Field(2, ge=1, le=4, description="Star ratings this far apart make a pair.")
    review: bool = Field(False, description="Send candidate pairs to Argilla and train on the reviewed ones.")
    annotation_config: Path | None = Field(
        None,
        description="`prefloop annotate` YAML (Argilla server, votes needed); default configs/annotation.yaml.",
    )
    review_dataset: str = Field("feedback-review", description="Argilla dataset the feedback pairs go to.")


class GateSettings(StrictModel):
    min_win_rate: float = Field(
        0.5, ge=0, le=1, description="Candidate must beat current on this share of prompts."
    )
    max_kl: float | None = Field(None, ge=0, description="Upper bound on KL(candidate || current) per token.")
    max_length_ratio: float | None = Field(2.0, gt=0, description="Candidate / current mean response length.")
    min_regression_pass_rate: float | None = Field(
        None, ge=0, le=1, description="Share of regression prompts where the candidate must score no worse."
    )


class EvalSettings(StrictModel):
    prompts: Path | None = Field(None, description="JSONL of regression prompts; default: the packaged set.")
    reward_model: str | None = Field(None, description="Reward model dir for the win rate (prefloop eval).")
    max_new_tokens: int = Field(64, ge=1)


class LoopConfig(StrictModel):
    serve: ServeConfig = Field(
        default_factory=ServeConfig, description="Base model and store the loop shares."
    )
    output_dir: Path = Field(
        Path("runs/loop"), description="Candidate adapters go to <output_dir>/<version>/."
    )
    algorithm: Literal["auto", "dpo", "kto"] = Field(
        "auto", description="auto = DPO when there are pairs, KTO when only unpaired thumbs."
    )
    train_config: Path | None = Field(
        None, description="DPO/KTO YAML config used as the base of every retrain."
    )
    train_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Dotted keys set on that config."
    )
    trigger: TriggerSettings = Field(default_factory=TriggerSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    server_url: str | None = Field(None, description="Running server to hot-swap after a promotion.")
