"""What routes get through `Depends`: the caller's key, a store session, the engine, the limits.

One source: the app factory builds one `Services` and stores it on the app; `services()` is the
only reader, and every other dependency (and so every route) reaches state through it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from threading import Lock
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from serving import feedback_store as fs
from serving.api.errors import APIError
from serving.config import LimitSettings, ServeConfig
from serving.generation import CURRENT_ALIAS, GenerationEngine
from serving.registry import ModelRegistry


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


@dataclass
class Services:
    """Everything the routes share, built once per app by `serving.api.app.create_app`."""

    settings: ServeConfig
    engine: GenerationEngine
    store: fs.FeedbackStore
    registry: ModelRegistry
    limiter: RateLimiter

    def sync_current(self) -> dict[str, str | None]:
        """Point `prefloop-current` at the registry's current version (loading it, unloading the old)."""
        version = self.registry.current()
        if version is None:
            previous = self.engine.swap(CURRENT_ALIAS, None)
        else:
            previous = self.engine.swap(CURRENT_ALIAS, version.id, version.adapter_path)
        return {
            "current": version.id if version else None,
            "previous": self.engine.version_of(previous) if previous else None,
        }


def services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]


def engine(svc: ServicesDep) -> GenerationEngine:
    return svc.engine


def store(svc: ServicesDep) -> fs.FeedbackStore:
    return svc.store


def limits(svc: ServicesDep) -> LimitSettings:
    return svc.settings.limits


def store_session(store: Annotated[fs.FeedbackStore, Depends(store)]) -> Iterator[Session]:
    with store.session() as session:
        yield session


bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def client_key(svc: ServicesDep, credentials: Credentials) -> str:
    """The caller's API key (the admin key works too); 401 without a valid one, 429 over the rate limit."""
    auth = svc.settings.auth
    key = credentials.credentials if credentials else None
    allowed = auth.client_keys() | ({auth.admin()} - {None})
    if key is None and auth.allow_anonymous:
        key = "anonymous"
    elif key is None or not any(secrets.compare_digest(key, k) for k in allowed):  # constant-time
        message = "missing API key (Authorization: Bearer ...)" if key is None else "invalid API key"
        raise APIError(401, message, "authentication_error", code="invalid_api_key")
    if not svc.limiter.allow(key):
        raise APIError(
            429,
            "rate limit exceeded for this API key",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
    return key


def require_admin(svc: ServicesDep, credentials: Credentials) -> str:
    """The admin key, or 401 (403 when the server has none configured)."""
    expected = svc.settings.auth.admin()
    if expected is None:
        raise APIError(403, "admin endpoints are disabled: no admin key configured", "permission_error")
    if credentials is None or not secrets.compare_digest(credentials.credentials, expected):
        raise APIError(
            401, "admin endpoints need the admin key", "authentication_error", code="invalid_api_key"
        )
    return credentials.credentials


ClientKey = Annotated[str, Depends(client_key)]
Engine = Annotated[GenerationEngine, Depends(engine)]
Store = Annotated[fs.FeedbackStore, Depends(store)]
Limits = Annotated[LimitSettings, Depends(limits)]
StoreSession = Annotated[Session, Depends(store_session)]
