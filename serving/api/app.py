"""The app factory: services, middleware, error handlers, routers. What `prefloop serve` runs."""

from __future__ import annotations

from fastapi import FastAPI

from serving import feedback_store as fs
from serving.api.auth import KeyRing
from serving.api.dependencies import Services
from serving.api.errors import install_error_handlers
from serving.api.middleware import Authenticate, BodySizeLimit
from serving.api.routers import admin, chat, feedback
from serving.api.schemas import Health
from serving.config import ServeConfig
from serving.generation import GenerationEngine
from serving.registry import ModelRegistry


def create_app(settings: ServeConfig, engine: GenerationEngine, store: fs.FeedbackStore) -> FastAPI:
    """The API over an engine and a store the caller owns (and closes)."""
    app = FastAPI(
        title="prefloop",
        version="0.1.0",
        description="OpenAI-compatible serving with a feedback loop.",
        # The schema is always there for clients and fuzzers, behind a key like every route;
        # the browser UIs only when enabled (a browser sends no bearer key by itself).
        docs_url="/docs" if settings.api_docs else None,
        redoc_url="/redoc" if settings.api_docs else None,
    )
    keys = KeyRing(settings.auth)
    services = Services(settings, engine, store, ModelRegistry(store, settings.adapters_root), keys)
    app.state.services = services  # read only by serving.api.dependencies.services
    for name, path in settings.adapters.items():
        engine.load_adapter(name, settings.adapter_path(path, f"adapters.{name}"))
    services.sync_current()

    install_error_handlers(app)
    # Added last = runs first: authenticate from the headers, then count body bytes.
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_request_bytes)
    app.add_middleware(Authenticate, keys=keys)

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health()

    app.include_router(chat.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    return app


def build_app(settings: ServeConfig) -> FastAPI:
    """Engine + store + app from a config."""
    from alignment.devices import plan_device

    engine = GenerationEngine(
        settings.model,
        plan_device(settings.dtype),
        max_batch_size=settings.batching.max_batch_size,
        max_wait_ms=settings.batching.max_wait_ms,
        served_name=settings.served_name,
        threads=settings.threads,
        merged_copies=settings.batching.merged_copies,
    )
    return create_app(settings, engine, fs.FeedbackStore(settings.store_url))
