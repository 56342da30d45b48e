"""`GET /v1/models` and `POST /v1/chat/completions` (plain, streamed, n>1), logged to the store."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from serving import feedback_store as fs
from serving.api.body import StrictJSONRoute
from serving.api.dependencies import Engine, Limits, Store, require_client
from serving.api.errors import APIError
from serving.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    ModelCard,
    ModelList,
    Usage,
)
from serving.config import LimitSettings
from serving.generation import Delta, Generation, GenerationEngine, Job, SamplingParams, UnknownModelError

router = APIRouter(prefix="/v1", dependencies=[Depends(require_client)], route_class=StrictJSONRoute)


@router.get("/models", response_model=ModelList)
def list_models(engine: Engine) -> ModelList:
    return ModelList(data=[ModelCard(id=name) for name in engine.model_names()])


def sampling(body: ChatCompletionRequest, limits: LimitSettings) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > limits.max_stop or any(not s for s in stop):
        raise APIError(400, f"stop: at most {limits.max_stop} non-empty sequences", param="stop")
    if body.n > limits.max_n:
        raise APIError(400, f"n: at most {limits.max_n} choices per request (got {body.n})", param="n")
    max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens: at most {limits.max_tokens} (got {max_tokens})", param="max_tokens")
    return SamplingParams(body.temperature, body.top_p, max_tokens, tuple(stop), body.n, body.seed)


def unknown_model(engine: GenerationEngine, model: str) -> APIError:
    names = ", ".join(engine.model_names())
    return APIError(
        404, f"model {model!r} does not exist; available: {names}", param="model", code="model_not_found"
    )


def usage(result: Generation) -> Usage:
    completion = sum(c.completion_tokens for c in result.choices)
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=completion,
        total_tokens=result.prompt_tokens + completion,
    )


def _log_rows(store: fs.FeedbackStore, rows: list[fs.Completion]) -> None:
    with store.write_lock, store.session() as session:
        fs.log_completions(session, rows)


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, engine: Engine, store: Store, limits: Limits) -> Any:
    started = time.perf_counter()
    try:  # before any work, and before a stream's 200 goes out
        engine.resolve(body.model)
    except UnknownModelError:
        raise unknown_model(engine, body.model) from None
    params = sampling(body, limits)
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
            raise unknown_model(engine, body.model) from None

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
            usage=usage(result),
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        job = admit()  # here, not before: a client gone before the first byte pins no adapter
        chunk = ChatCompletionChunk(
            id=response_id, created=created, model=body.model, system_fingerprint=job.version, choices=[]
        )

        def sse(choices: list[ChunkChoice], totals: Usage | None = None) -> str:
            payload = chunk.model_copy(update={"choices": choices, "usage": totals})
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
                    yield sse([], usage(event))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
