"""Configs for `prefloop serve` (ServeConfig) and `prefloop loop` (LoopConfig)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Discriminator, Field, SecretStr, Tag, model_validator

from alignment.config import StrictModel
from alignment.devices import DTypeName
from alignment.models import DEFAULT_MODEL
from alignment.paths import PathEscapeError, contained
from reward.judge import JudgeSettings


class BatchingSettings(StrictModel):
    max_batch_size: int = Field(16, ge=1, description="Most rows (requests x n) in one generate call.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the first request waits for others to join.")
    merged_copies: int = Field(
        2,
        ge=0,
        description="Adapters kept merged into a bf16 copy of the weights for batches that use only that "
        "adapter (one copy is the model's size; 0 = always the per-row LoRA path).",
    )


class LimitSettings(StrictModel):
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Larger bodies get 413.")
    max_messages: int = Field(64, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_tokens: int = Field(1024, ge=1, description="Upper bound for a request's max_tokens.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when the request gives none.")
    max_n: int = Field(8, ge=1)
    max_stop: int = Field(4, ge=0, description="Most stop sequences per request (OpenAI allows 4).")
    max_comment_chars: int = Field(4000, ge=1)
    requests_per_minute: int = Field(
        600, ge=0, description="Chat and model-list requests per API key and minute; 0 = unlimited."
    )
    feedback_per_minute: int = Field(
        600, ge=0, description="/v1/feedback posts per API key and minute (its own budget); 0 = unlimited."
    )


KEY_HASH_PREFIX = "sha256:"  # a key given as "sha256:<64 hex>" is the hash of the real key
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def key_digest(value: str) -> str:
    """The hex sha256 a key is known by: given as "sha256:<hex>", or hashed from the key itself."""
    if value.startswith(KEY_HASH_PREFIX):
        return value.removeprefix(KEY_HASH_PREFIX).lower()
    return hashlib.sha256(value.encode()).hexdigest()


def _check_hash_form(secret: SecretStr) -> SecretStr:
    # Only a "sha256:" value (a hash, not a secret) can fail here, so the error may quote it.
    value = secret.get_secret_value()
    if value.startswith(KEY_HASH_PREFIX) and not _SHA256_HEX.fullmatch(value.removeprefix(KEY_HASH_PREFIX)):
        raise ValueError('"sha256:" must be followed by 64 hex digits')
    return secret


KeyValue = Annotated[SecretStr, AfterValidator(_check_hash_form)]


class APIKey(StrictModel):
    """One client key with its own name and limits (a backend posting a product's feedback needs more)."""

    key: KeyValue | None = Field(None, description='The bearer key itself, or "sha256:<hex>".')
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="hex sha256 of the key: `printf %s KEY | sha256sum`."
    )
    name: str | None = Field(
        None, min_length=1, description="Names the key in limits and logs (default: key-<hash prefix>)."
    )
    requests_per_minute: int | None = Field(
        None, ge=0, description="This key's chat/models limit (default: limits.requests_per_minute)."
    )
    feedback_per_minute: int | None = Field(
        None, ge=0, description="This key's /v1/feedback limit (default: limits.feedback_per_minute)."
    )

    @model_validator(mode="after")
    def _key_or_hash(self) -> APIKey:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key or sha256")
        if self.key is not None and not self.key.get_secret_value().strip():
            raise ValueError("key: empty")
        return self

    def digest(self) -> str:
        return self.sha256.lower() if self.sha256 else key_digest(self.key.get_secret_value())  # type: ignore[union-attr]


ClientKeyEntry = Annotated[
    Annotated[KeyValue, Tag("key")] | Annotated[APIKey, Tag("entry")],
    Discriminator(lambda v: "entry" if isinstance(v, dict | APIKey) else "key"),
]


class AuthSettings(StrictModel):
    api_keys: list[ClientKeyEntry] = Field(
        default_factory=list,
        description='Client keys: a key, "sha256:<hex>", or {key|sha256, name, requests_per_minute, '
        "feedback_per_minute}; also $PREFLOOP_API_KEYS (comma-separated keys or sha256: hashes).",
    )
    admin_key: KeyValue | None = Field(
        None, description='Admin bearer key or "sha256:<hex>"; also read from $PREFLOOP_ADMIN_KEY.'
    )
    allow_anonymous: bool = Field(False, description="Serve clients without a key (local development only).")

    def client_keys(self) -> list[APIKey]:
        env = [k.strip() for k in os.environ.get("PREFLOOP_API_KEYS", "").split(",") if k.strip()]
        keys = []
        for item in [*self.api_keys, *(SecretStr(k) for k in env)]:
            if isinstance(item, APIKey):
                keys.append(item)
            elif item.get_secret_value().strip():
                keys.append(APIKey(sha256=key_digest(item.get_secret_value())))
        return keys

    def _admin_value(self) -> str | None:
        value = os.environ.get("PREFLOOP_ADMIN_KEY") or (
            self.admin_key.get_secret_value() if self.admin_key else None
        )
        return value or None

    def admin_digest(self) -> str | None:
        value = self._admin_value()
        return key_digest(value) if value else None

    def admin(self) -> str | None:
        """The admin key to call a server with (None when only its hash is configured)."""
        value = self._admin_value()
        return None if value is None or value.startswith(KEY_HASH_PREFIX) else value


class ServeConfig(StrictModel):
    model: str = Field(DEFAULT_MODEL, description="Base model: embedded name, local path or hub id.")
    served_name: str | None = Field(
        None, description="Name of the base model in /v1/models (default: model)."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Extra adapters to load: name -> path."
    )
    adapters_root: Path | None = Field(
        None,
        description="Directory every served adapter must resolve inside: the `adapters:` entries, "
        "POST /admin/adapters and registry versions (relative paths are taken from it). "
        "Unset: paths are used as given.",
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
    api_docs: bool = Field(
        False, description="Serve /docs and /redoc (with a key, like /openapi.json); off by default."
    )

    def adapter_path(self, path: str | Path, what: str = "adapter path") -> Path:
        """`path` checked against `adapters_root` (PathEscapeError when it resolves outside)."""
        if self.adapters_root is None:
            return Path(path)
        return contained(self.adapters_root, path, what, allow_absolute=True)

    @model_validator(mode="after")
    def _adapters_stay_inside_their_root(self) -> ServeConfig:
        for name, path in self.adapters.items():
            try:
                self.adapter_path(path, f"adapters.{name}")
            except PathEscapeError as exc:
                raise ValueError(str(exc)) from None
        return self


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
    min_win_rate_lower_bound: float | None = Field(
        None, ge=0, le=1, description="The reward win rate's 95% interval must start at or above this."
    )
    min_judge_win_rate: float | None = Field(
        None, ge=0, le=1, description="LLM-judge win rate (both orders) needed; needs eval.judge."
    )
    max_perplexity_increase: float | None = Field(
        None, ge=0, description="Allowed relative perplexity rise on eval.sft_heldout (0.1 = +10%)."
    )


class EvalSettings(StrictModel):
    prompts: Path | None = Field(None, description="JSONL of regression prompts; default: the packaged set.")
    reward_model: str | None = Field(None, description="Reward model dir for the win rate (prefloop eval).")
    max_new_tokens: int = Field(64, ge=1)
    judge: JudgeSettings | None = Field(None, description="LLM judge for gate.min_judge_win_rate.")
    sft_heldout: Path | None = Field(
        None, description="Held-out SFT conversations for gate.max_perplexity_increase."
    )
    max_heldout: int = Field(64, ge=1, description="Conversations of sft_heldout used.")


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

    @model_validator(mode="after")
    def _output_dir_is_servable(self) -> LoopConfig:
        # Candidates the loop trains must be loadable by the server that shares its registry.
        if self.serve.adapters_root is not None:
            try:
                self.serve.adapter_path(self.output_dir.absolute(), "output_dir")
            except PathEscapeError as exc:
                raise ValueError(f"{exc} (serve.adapters_root)") from None
        return self

    @model_validator(mode="after")
    def _gate_has_its_inputs(self) -> LoopConfig:
        # Found at load time, not after hours of training.
        if self.gate.min_judge_win_rate is not None and self.eval.judge is None:
            raise ValueError("gate.min_judge_win_rate needs eval.judge (an LLM judge endpoint)")
        if self.gate.max_perplexity_increase is not None and self.eval.sft_heldout is None:
            raise ValueError("gate.max_perplexity_increase needs eval.sft_heldout (held-out SFT data)")
        return self
