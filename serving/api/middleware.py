"""Pure ASGI middleware: what happens before a route reads a single byte of the body.

`Authenticate` (outermost) answers 401 from the headers alone, so an unauthenticated caller
gets no work done and no body read; it leaves the `Caller` in the scope for the dependencies.
`BodySizeLimit` counts the bytes as they arrive (Content-Length or chunked alike) and stops
the request with 413 as soon as the limit is passed, so an oversized body is never read in full.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api.auth import ANONYMOUS, KeyRing, bearer_token
from serving.api.errors import error_body

PUBLIC_PATHS = frozenset({"/health"})  # everything else, the API docs included, needs a key


class BodyTooLarge(HTTPException):
    """Raised from `receive` mid-body; FastAPI re-raises HTTPExceptions from body reading."""

    def __init__(self, limit: int, size: int | None = None):
        said = f"request body is {size} bytes" if size is not None else "request body is over the limit"
        super().__init__(413, f"{said}; the limit is {limit}")


async def send_error(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class Authenticate:
    def __init__(self, app: ASGIApp, keys: KeyRing):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        token = bearer_token(_header(scope, b"authorization"))
        caller = self.keys.identify(token) if token is not None else None
        if token is None and self.keys.allow_anonymous:
            caller = ANONYMOUS
        if caller is None:
            message = "missing API key (Authorization: Bearer ...)" if token is None else "invalid API key"
            body = error_body(message, "authentication_error", code="invalid_api_key")
            await send_error(send, 401, body, {"WWW-Authenticate": "Bearer"})
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            exc = BodyTooLarge(self.max_bytes, declared)
            await send_error(send, 413, error_body(exc.detail, "invalid_request_error"))
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:  # read outside a route's body parsing (none does today)
            if started:
                raise
            await send_error(send, 413, error_body(exc.detail, "invalid_request_error"))


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None
