"""The OpenAI-compatible HTTP API: chat completions (plain, streamed, n>1), models, feedback, admin.

Routes are typed end to end (pydantic request/response models after the OpenAI schema), auth and
database sessions come in through `Depends`, and every error is an OpenAI-style
`{"error": {"message", "type", "param", "code"}}` body, so the official client raises the right
exception with a readable message.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from threading import Lock
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import feedback_store as fs
from serving.config import ServeConfig
from serving.generation import (
    CURRENT_ALIAS,
    Delta,
    Generation,
    GenerationEngine,
    Job,
    SamplingParams,
    UnknownModelError,
)
from serving.registry import ModelRegistry

# --- OpenAI-shaped request and response models ---------------------------------------------


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


class AdapterLoad(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    path: str


class AdminStatus(BaseModel):
    models: list[str]
    current: str
    adapters: dict[str, str]
    counts: dict[str, int]


# --- errors ---------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error_body(
    status: int, message: str, type: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        response = _error_body(exc.status, exc.message, exc.type, exc.param, exc.code)
        if exc.status == 429:
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers 400 for a malformed body; name every offending field.
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{loc}: {err['msg']}")
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return _error_body(400, "invalid request: " + "; ".join(problems), "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_body(exc.status_code, str(exc.detail), "invalid_request_error")


# --- auth and limits ------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per API key: `per_minute` requests, refilled continuously, bursts up to it."""

    def __init__(self, per_minute: int):
        self.rate, self.capacity = per_minute / 60.0, float(per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = Lock()

    def allow(self, key: str) -> bool:
        if self.rate == 0:
            return True
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            allowed = tokens >= 1
            self.buckets[key] = (tokens - 1 if allowed else tokens, now)
            return allowed


bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def client_key(request: Request, credentials: Credentials) -> str:
    """The caller's API key (the admin key works too); 401 without a valid one, 429 over the rate limit."""
    settings: ServeConfig = request.app.state.settings
    key = credentials.credentials if credentials else None
    allowed = settings.auth.client_keys() | ({settings.auth.admin()} - {None})
    if key is None and settings.auth.allow_anonymous:
        key = "anonymous"
    elif key is None or not any(secrets.compare_digest(key, k) for k in allowed):  # constant-time
        message = "missing API key (Authorization: Bearer ...)" if key is None else "invalid API key"
        raise APIError(401, message, "authentication_error", code="invalid_api_key")
    if not request.app.state.limiter.allow(key):
        raise APIError(
            429, "rate limit exceeded for this API key", "rate_limit_error", code="rate_limit_exceeded"
        )
    return key


def admin_key(request: Request, credentials: Credentials) -> str:
    expected = request.app.state.settings.auth.admin()
    if expected is None:
        raise APIError(403, "admin endpoints are disabled: no admin key configured", "permission_error")
    if credentials is None or not secrets.compare_digest(credentials.credentials, expected):
        raise APIError(
            401, "admin endpoints need the admin key", "authentication_error", code="invalid_api_key"
        )
    return credentials.credentials


def store_session(request: Request) -> Iterator[Session]:
    with request.app.state.store.session() as session:
        yield session


ClientKey = Annotated[str, Depends(client_key)]
AdminKey = Annotated[str, Depends(admin_key)]
StoreSession = Annotated[Session, Depends(store_session)]


# --- the app --------------------------------------------------------------------------------


def create_app(settings: ServeConfig, engine: GenerationEngine, store: fs.FeedbackStore) -> FastAPI:
    app = FastAPI(
        title="prefloop", version="0.1.0", description="OpenAI-compatible serving with a feedback loop."
    )
    app.state.settings, app.state.engine, app.state.store = settings, engine, store
    app.state.registry = registry = ModelRegistry(store)
    app.state.limiter = RateLimiter(settings.limits.requests_per_minute)
    limits = settings.limits
    _install_error_handlers(app)

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next: Any) -> Response:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_request_bytes:
            return _error_body(
                413,
                f"request body is {size} bytes; the limit is {limits.max_request_bytes}",
                "invalid_request_error",
            )
        return await call_next(request)

    def sync_current() -> dict[str, str | None]:
        """Point `prefloop-current` at the registry's current version (loading it, unloading the old)."""
        version = registry.current()
        if version is None:
            previous = engine.swap(CURRENT_ALIAS, None)
        else:
            previous = engine.swap(CURRENT_ALIAS, version.id, version.adapter_path)
        return {
            "current": version.id if version else None,
            "previous": engine.version_of(previous) if previous else None,
        }

    for name, path in settings.adapters.items():
        engine.load_adapter(name, path)
    sync_current()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList)
    def list_models(_: ClientKey) -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in engine.model_names()])

    def sampling(body: ChatCompletionRequest) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > limits.max_stop or any(not s for s in stop):
            raise APIError(400, f"stop: at most {limits.max_stop} non-empty sequences", param="stop")
        if body.n > limits.max_n:
            raise APIError(400, f"n: at most {limits.max_n} choices per request (got {body.n})", param="n")
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise APIError(
                400, f"max_tokens: at most {limits.max_tokens} (got {max_tokens})", param="max_tokens"
            )
        return SamplingParams(body.temperature, body.top_p, max_tokens, tuple(stop), body.n)

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, _: ClientKey) -> Any:
        started = time.perf_counter()
        params = sampling(body)
        if len(body.messages) > limits.max_messages:
            raise APIError(
                400, f"messages: at most {limits.max_messages} (got {len(body.messages)})", param="messages"
            )
        messages = [m.as_dict() for m in body.messages]
        prompt_ids = engine.encode(messages)
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt is {len(prompt_ids)} tokens; this server accepts at most {limits.max_prompt_tokens}",
                param="messages",
                code="context_length_exceeded",
            )

        def admit() -> Job:
            try:
                return engine.submit(body.model, prompt_ids, params)
            except UnknownModelError:
                names = ", ".join(engine.model_names())
                raise APIError(
                    404,
                    f"model {body.model!r} does not exist; available: {names}",
                    param="model",
                    code="model_not_found",
                ) from None

        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        ids = [f"{response_id}-{i}" for i in range(params.n)]
        created = int(time.time())

        async def log(result: Generation) -> None:
            digest = fs.prompt_hash(messages)
            rows = [
                fs.Completion(
                    id=ids[c.index],
                    response_id=response_id,
                    choice_index=c.index,
                    prompt_hash=digest,
                    prompt=messages,
                    response=c.text,
                    model=body.model,
                    model_version=result.model_version,
                    params=params.__dict__ | {"stop": list(params.stop)},
                    finish_reason=c.finish_reason or "stop",
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=c.completion_tokens,
                    latency_ms=result.latency_s * 1000,
                )
                for c in result.choices
            ]
            await run_in_threadpool(_log_rows, store, rows)

        if not body.stream:
            result = None
            async for event in engine.stream(admit(), started):
                result = event
            assert isinstance(result, Generation)
            await log(result)
            return ChatCompletion(
                id=response_id,
                created=created,
                model=body.model,
                system_fingerprint=result.model_version,
                choices=[
                    ChatChoice(
                        index=c.index,
                        message=AssistantMessage(content=c.text),
                        finish_reason=c.finish_reason,
                        completion_id=ids[c.index],
                    )
                    for c in result.choices
                ],
                usage=_usage(result),
            )

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            job = admit()  # here, not before: a client gone before the first byte pins no adapter
            chunk = ChatCompletionChunk(
                id=response_id, created=created, model=body.model, system_fingerprint=job.version, choices=[]
            )

            def sse(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
                payload = chunk.model_copy(update={"choices": choices, "usage": usage})
                return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"

            yield sse(
                [
                    ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content=""), completion_id=ids[i])
                    for i in range(params.n)
                ]
            )
            async for event in engine.stream(job, started):
                if isinstance(event, Delta):
                    if event.text or event.finish_reason:
                        delta = ChunkDelta(content=event.text or None)
                        yield sse(
                            [
                                ChunkChoice(
                                    index=event.index,
                                    delta=delta,
                                    finish_reason=event.finish_reason,
                                    completion_id=ids[event.index],
                                )
                            ]
                        )
                else:
                    await log(event)  # before [DONE], so feedback sent right after the stream finds it
                    if include_usage:
                        yield sse([], _usage(event))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/feedback", response_model=FeedbackReceipt, status_code=201)
    def post_feedback(
        body: FeedbackRequest,
        response: Response,
        session: StoreSession,
        _: ClientKey,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    ) -> FeedbackReceipt:
        if body.comment and len(body.comment) > limits.max_comment_chars:
            raise APIError(400, f"comment: at most {limits.max_comment_chars} characters", param="comment")
        key = body.idempotency_key or idempotency_key
        common = {
            "comment": body.comment,
            "corrected_response": body.corrected_response,
            "idempotency_key": key,
        }
        if isinstance(body, ThumbsFeedback):
            item = fs.FeedbackInput(
                "thumbs", body.completion_id, value=1 if body.value == "up" else -1, **common
            )
        elif isinstance(body, RatingFeedback):
            item = fs.FeedbackInput("rating", body.completion_id, value=body.stars, **common)
        else:
            item = fs.FeedbackInput("pairwise", body.chosen_id, rejected_id=body.rejected_id, **common)
        try:
            with store.write_lock:
                row, created = fs.add_feedback(session, item)
        except fs.FeedbackError as exc:
            raise APIError(exc.status, str(exc), param=exc.param) from None
        if not created:
            response.status_code = 200
        return FeedbackReceipt(
            id=row.id,
            type=row.kind,
            completion_id=row.completion_id,
            rejected_id=row.rejected_id,
            duplicate=not created,
        )

    @app.get("/admin/status", response_model=AdminStatus)
    def admin_status(_: AdminKey, session: StoreSession) -> AdminStatus:
        return AdminStatus(
            models=engine.model_names(),
            current=engine.version_of(engine.resolve(CURRENT_ALIAS)),
            adapters={k: str(v) for k, v in engine.adapters.items()},
            counts=fs.counts(session),
        )

    @app.post("/admin/reload")
    def admin_reload(_: AdminKey) -> dict[str, str | None]:
        """Hot-swap `prefloop-current` to the registry's current version (after promote or rollback)."""
        return sync_current()

    @app.post("/admin/adapters")
    def admin_load_adapter(body: AdapterLoad, _: AdminKey) -> dict[str, str]:
        try:
            engine.load_adapter(body.name, body.path)
        except (ValueError, OSError) as exc:
            raise APIError(
                400, f"cannot load adapter {body.name!r} from {body.path}: {exc}", param="path"
            ) from None
        return {"loaded": body.name}

    return app


def _log_rows(store: fs.FeedbackStore, rows: list[fs.Completion]) -> None:
    with store.write_lock, store.session() as session:
        fs.log_completions(session, rows)


def _usage(result: Generation) -> Usage:
    completion = sum(c.completion_tokens for c in result.choices)
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=completion,
        total_tokens=result.prompt_tokens + completion,
    )


def build_app(settings: ServeConfig) -> FastAPI:
    """Engine + store + app from a config: what `prefloop serve` runs."""
    from alignment.devices import plan_device

    engine = GenerationEngine(
        settings.model,
        plan_device(settings.dtype),
        max_batch_size=settings.batching.max_batch_size,
        max_wait_ms=settings.batching.max_wait_ms,
        served_name=settings.served_name,
        threads=settings.threads,
    )
    return create_app(settings, engine, fs.FeedbackStore(settings.store_url))
