"""JSON request bodies parsed strictly, so hostile bytes get a 400 that names the problem.

FastAPI's own parsing lets three things through to a 500: invalid UTF-8, nesting deep enough
to exhaust the parser's recursion, and lone surrogates (`"\\ud800"` is valid JSON, but no
database, tokenizer or JSON encoder accepts the string it decodes to). `StrictJSONRoute` is
FastAPI's documented hook for a custom request class; every router uses it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

MAX_JSON_DEPTH = 32  # our deepest body (messages[].content[].text) is 5 levels
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidBody(HTTPException):
    """An HTTPException, so FastAPI re-raises it from body parsing and our handler shapes it."""

    def __init__(self, message: str):
        super().__init__(400, f"invalid request body: {message}")


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidBody(f"not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise InvalidBody(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    check_json(data)
    return data


def check_json(data: Any) -> None:
    """Reject nesting deeper than MAX_JSON_DEPTH and lone surrogates in any key or string."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:  # iterative: the depth check must not itself recurse
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidBody(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise InvalidBody(f"{path or 'body'}: lone UTF-16 surrogate in a string")
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise InvalidBody(f"{path or 'body'}: lone UTF-16 surrogate in a key")
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i), depth + 1) for i, item in enumerate(value))


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
