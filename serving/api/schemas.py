"""Request and response bodies of the HTTP API, after the OpenAI schema (plus prefloop's feedback).

The routes declare these types, so FastAPI validates every body and the OpenAPI document
(`/openapi.json`) is correct, and fuzzable, for free.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# --- chat completions -----------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI parameters (user, logit_bias, ...) are accepted and ignored, like other servers do.
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="Same seed, model version and request: same choices."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    completion_id: str = Field(description="prefloop: the id feedback refers to (one per choice).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str = Field(description="The model version that answered.")
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None
    completion_id: str


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "prefloop"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- feedback -------------------------------------------------------------------------------


class _FeedbackBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str | None = None
    corrected_response: str | None = Field(
        None, min_length=1, description="What the answer should have been."
    )
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=255, description="Or the Idempotency-Key header."
    )


class ThumbsFeedback(_FeedbackBase):
    type: Literal["thumbs"]
    completion_id: str
    value: Literal["up", "down"]


class RatingFeedback(_FeedbackBase):
    type: Literal["rating"]
    completion_id: str
    stars: int = Field(ge=1, le=5)


class PairwiseFeedback(_FeedbackBase):
    type: Literal["pairwise"]
    chosen_id: str = Field(description="The completion the user preferred.")
    rejected_id: str = Field(description="The other completion, for the same prompt.")


FeedbackRequest = Annotated[ThumbsFeedback | RatingFeedback | PairwiseFeedback, Field(discriminator="type")]


class FeedbackReceipt(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"
    type: str
    completion_id: str
    rejected_id: str | None
    duplicate: bool = Field(description="True when this idempotency key was already recorded.")


# --- admin ----------------------------------------------------------------------------------


class AdapterLoad(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    path: str


class AdapterLoaded(BaseModel):
    loaded: str


class CurrentSwap(BaseModel):
    current: str | None = Field(description="The version `prefloop-current` now serves (None = base).")
    previous: str | None = Field(description="The version it served before.")


class AdminStatus(BaseModel):
    models: list[str]
    current: str
    adapters: dict[str, str]
    counts: dict[str, int]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
