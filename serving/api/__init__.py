"""The OpenAI-compatible HTTP API, in FastAPI's "bigger applications" shape.

- `schemas`: request/response bodies (pydantic, after the OpenAI schema);
- `errors`: the OpenAI error shape and the exception handlers;
- `dependencies`: keys, rate limits, store sessions, engine and store, all from one `Services`;
- `middleware`: what runs before a body is read (size limit);
- `routers/`: `chat` (/v1/models, /v1/chat/completions), `feedback` (/v1/feedback), `admin` (/admin/*);
- `app`: the factory (`create_app`, `build_app`) that includes them.
"""

from serving.api.app import build_app, create_app

__all__ = ["build_app", "create_app"]
