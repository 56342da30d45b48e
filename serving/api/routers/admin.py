"""`/admin/*`: status, hot-swap `prefloop-current`, load an adapter. Only with the admin key."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from alignment.paths import PathEscapeError
from serving import feedback_store as fs
from serving.api.body import StrictJSONRoute
from serving.api.dependencies import Engine, ServicesDep, StoreSession, require_admin
from serving.api.errors import APIError
from serving.api.schemas import AdapterLoad, AdapterLoaded, AdminStatus, CurrentSwap
from serving.generation import CURRENT_ALIAS
from serving.registry import RegistryError

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], route_class=StrictJSONRoute)


@router.get("/status", response_model=AdminStatus)
def admin_status(engine: Engine, session: StoreSession) -> AdminStatus:
    return AdminStatus(
        models=engine.model_names(),
        current=engine.version_of(engine.resolve(CURRENT_ALIAS)),
        adapters={k: str(v) for k, v in engine.adapters.items()},
        counts=fs.counts(session),
    )


@router.post("/reload", response_model=CurrentSwap)
def admin_reload(svc: ServicesDep) -> CurrentSwap:
    """Hot-swap `prefloop-current` to the registry's current version (after promote or rollback)."""
    try:
        return CurrentSwap(**svc.sync_current())
    except RegistryError as exc:
        # e.g. the current version's adapter lies outside serve.adapters_root
        raise APIError(400, f"cannot serve the registry's current version: {exc}") from None


@router.post("/adapters", response_model=AdapterLoaded)
def admin_load_adapter(body: AdapterLoad, svc: ServicesDep) -> AdapterLoaded:
    try:
        path = svc.settings.adapter_path(body.path, "path")
    except PathEscapeError as exc:
        raise APIError(400, f"adapter {body.name!r}: {exc} (serve.adapters_root)", param="path") from None
    try:
        svc.engine.load_adapter(body.name, path)
    except (ValueError, OSError) as exc:
        raise APIError(
            400, f"cannot load adapter {body.name!r} from {body.path}: {exc}", param="path"
        ) from None
    return AdapterLoaded(loaded=body.name)
