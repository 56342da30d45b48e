"""`/admin/*`: status, hot-swap `prefloop-current`, load an adapter. Only with the admin key."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from serving import feedback_store as fs
from serving.api.body import StrictJSONRoute
from serving.api.dependencies import Engine, ServicesDep, StoreSession, require_admin
from serving.api.errors import APIError
from serving.api.schemas import AdapterLoad, AdapterLoaded, AdminStatus, CurrentSwap
from serving.generation import CURRENT_ALIAS

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
    return CurrentSwap(**svc.sync_current())


@router.post("/adapters", response_model=AdapterLoaded)
def admin_load_adapter(body: AdapterLoad, engine: Engine) -> AdapterLoaded:
    try:
        engine.load_adapter(body.name, body.path)
    except (ValueError, OSError) as exc:
        raise APIError(
            400, f"cannot load adapter {body.name!r} from {body.path}: {exc}", param="path"
        ) from None
    return AdapterLoaded(loaded=body.name)
