"""Configuration of the annotation workspace: `configs/annotation.yaml` validates against `AnnotationConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignment.config import StrictModel

DEFAULT_GUIDELINES = """\
Read the conversation, then both responses.
Pick the response that is more helpful, honest and harmless for the last user turn.
Choose **tie** only when neither is better, and **both bad** when neither is acceptable.
Judge the content, not the length or the position (A/B order is random)."""


class ServerSettings(StrictModel):
    url: str | None = Field(
        None, description="A remote Argilla to use instead of the local one (env ARGILLA_API_URL wins)."
    )
    api_key: str | None = Field(
        None, description="Owner API key for a remote Argilla (env ARGILLA_API_KEY wins)."
    )
    home: str | None = Field(None, description="Server state directory (default $PREFLOOP_HOME/argilla).")
    host: str = "127.0.0.1"
    port: int = Field(6900, gt=0, lt=65536)
    database_url: str | None = Field(
        None, description="postgresql://... ; default: SQLite file in the server home."
    )
    redis_url: str | None = Field(None, description="Default: the bundled redis-server on a free local port.")
    search_engine: Literal["sql", "elasticsearch", "opensearch"] = Field(
        "sql", description="'sql' needs no extra service; ES/OpenSearch for teams that run them."
    )
    elasticsearch_url: str | None = Field(
        None, description="Only for search_engine elasticsearch/opensearch."
    )
    owner_username: str = "prefloop"
    startup_timeout_s: float = Field(120.0, gt=0)


class DatasetSettings(StrictModel):
    name: str = Field("preferences", description="Argilla dataset name.")
    workspace: str = Field("prefloop", description="Argilla workspace (one per project).")
    guidelines: str = DEFAULT_GUIDELINES
    min_submitted: int = Field(2, ge=1, description="Overlap: submitted responses before a record completes.")
    ratings: bool = Field(True, description="Ask an optional 1-5 rating per response.")
    rationale: bool = Field(True, description="Ask an optional free-text rationale.")


class PushSettings(StrictModel):
    model: str = Field("smollm2-135m-instruct", description="Policy that samples the candidate responses.")
    adapter: str | None = Field(None, description="PEFT adapter directory applied on top of `model`.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub model (off: only transformers' own code)."
    )
    reward_model: str | None = Field(
        None, description="Reward model directory; its scores become suggestions."
    )
    num_samples: int = Field(
        2, ge=2, description="k responses sampled per prompt; pairs are built among them."
    )
    max_pairs_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(128, gt=0)
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    min_distance: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Drop pairs whose responses are this close (1 - token Jaccard similarity).",
    )
    seed: int = 0


class PullSettings(StrictModel):
    min_votes: int = Field(2, ge=1, description="Submitted votes a record needs to be aggregated.")
    include_ties: bool = Field(
        False, description="Keep records whose majority is a tie (written as no pair)."
    )
    agreement_threshold: float = Field(
        0.4, description="Flag annotators whose agreement with the consensus is below this."
    )
    output_dir: str = Field(
        "data/preferences", description="Versioned datasets are written under this directory."
    )


class AnnotationConfig(StrictModel):
    server: ServerSettings = Field(default_factory=ServerSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    push: PushSettings = Field(default_factory=PushSettings)
    pull: PullSettings = Field(default_factory=PullSettings)
