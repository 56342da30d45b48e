"""What routes get through `Depends`: the caller, rate limits, a store session, engine and store.

One source: the app factory builds one `Services` and stores it on the app; `services()` is the
only reader, and every other dependency (and so every route) reaches state through it. Who the
caller is was settled by `middleware.Authenticate` before the body was read; here routers decide
what that caller may do (`require_client`, `require_feedback_client`, `require_admin`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from threading import Lock
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from serving import feedback_store as fs
from serving.api.auth import Caller, KeyRing
from serving.api.errors import APIError
from serving.config import LimitSettings, ServeConfig
from serving.generation import CURRENT_ALIAS, GenerationEngine
from serving.registry import ModelRegistry


class RateLimiter:
    """Token buckets per (budget, caller): `per_minute` requests, refilled continuously, bursts up to it."""

    def __init__(self) -> None:
        self.buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self.lock = Lock()

    def acquire(self, budget: str, caller: str, per_minute: int) -> float:
        """0.0 when the request may go ahead, else the seconds until it may."""
        if per_minute == 0:
            return 0.0
        rate, now = per_minute / 60.0, time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get((budget, caller), (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            allowed = tokens >= 1
            self.buckets[(budget, caller)] = (tokens - 1 if allowed else tokens, now)
        return 0.0 if allowed else (1 - tokens) / rate


@dataclass
class Services:
    """Everything the routes share, built once per app by `serving.api.app.create_app`."""

    settings: ServeConfig
    engine: GenerationEngine
    store: fs.FeedbackStore
    registry: ModelRegistry
    keys: KeyRing
    limiter: RateLimiter = field(default_factory=RateLimiter)

    def sync_current(self) -> dict[str, str | None]:
        """Point `prefloop-current` at the registry's current version (loading it, unloading the old)."""
        version = self.registry.current()
        if version is None:
            previous = self.engine.swap(CURRENT_ALIAS, None)
        else:
            # A row written by another process is checked like any other adapter path.
            adapter = self.registry.adapter_of(version)
            previous = self.engine.swap(CURRENT_ALIAS, version.id, adapter)
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


# Declares the scheme in the OpenAPI document; the key itself was checked by the middleware.
bearer = HTTPBearer(auto_error=False)


def caller(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    found = request.scope.get("state", {}).get("caller")
    if not isinstance(found, Caller):  # only if the app runs without its Authenticate middleware
        raise APIError(401, "missing API key", "authentication_error", code="invalid_api_key")
    return found


CallerDep = Annotated[Caller, Depends(caller)]


def _limit(svc: Services, who: Caller, budget: str, per_minute: int) -> Caller:
    wait = svc.limiter.acquire(budget, who.name, per_minute)
    if wait:
        raise APIError(
            429,
            f"rate limit exceeded for this API key ({per_minute} {budget} per minute)",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return who


def require_client(svc: ServicesDep, who: CallerDep) -> Caller:
    """Any valid key (the admin key too), within its requests-per-minute budget."""
    per_minute = who.requests_per_minute
    return _limit(
        svc, who, "requests", svc.settings.limits.requests_per_minute if per_minute is None else per_minute
    )


def require_feedback_client(svc: ServicesDep, who: CallerDep) -> Caller:
    """Any valid key, within its own feedback budget (a backend may post a whole product's)."""
    per_minute = who.feedback_per_minute
    return _limit(
        svc, who, "feedback", svc.settings.limits.feedback_per_minute if per_minute is None else per_minute
    )


def require_admin(svc: ServicesDep, who: CallerDep) -> Caller:
    """The admin key, or 401 (403 when the server has none configured)."""
    if not svc.keys.has_admin:
        raise APIError(403, "admin endpoints are disabled: no admin key configured", "permission_error")
    if not who.admin:
        raise APIError(
            401, "admin endpoints need the admin key", "authentication_error", code="invalid_api_key"
        )
    return who


Engine = Annotated[GenerationEngine, Depends(engine)]
Store = Annotated[fs.FeedbackStore, Depends(store)]
Limits = Annotated[LimitSettings, Depends(limits)]
StoreSession = Annotated[Session, Depends(store_session)]
