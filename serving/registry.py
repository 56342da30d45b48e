"""The model registry: every trained version with its lineage, and which one is current.

Versions live in the feedback store's database (`model_versions`), so the server, the loop and
the CLI agree on one source of truth. "Current" is the last row of the append-only `promotions`
table: promoting and rolling back both append, so the history of what was served is never lost.
No promotion yet means the base model is current.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from alignment.paths import PathEscapeError, contained
from serving.feedback_store import FeedbackStore, ModelVersion, Promotion, utcnow


class RegistryError(LookupError):
    pass


@dataclass(frozen=True)
class VersionInfo:
    id: str
    parent_id: str | None
    base_model: str
    adapter_path: str | None
    data_version: str | None
    config: dict[str, Any]
    eval_result: dict[str, Any] | None
    status: str
    created_at: datetime
    promoted_at: datetime | None

    @classmethod
    def of(cls, row: ModelVersion) -> VersionInfo:
        return cls(**{f: getattr(row, f) for f in cls.__dataclass_fields__})


class ModelRegistry:
    def __init__(self, store: FeedbackStore, adapters_root: Path | None = None):
        self.store = store
        # When set (ServeConfig.adapters_root), no version may point at an adapter outside it.
        self.adapters_root = adapters_root

    def _check_adapter(self, version_id: str, path: str | None) -> Path | None:
        if path is None or self.adapters_root is None:
            return None if path is None else Path(path)
        try:
            return contained(
                self.adapters_root, path, f"version {version_id} adapter_path", allow_absolute=True
            )
        except PathEscapeError as exc:
            raise RegistryError(str(exc)) from None

    def adapter_of(self, version: VersionInfo) -> Path | None:
        """The version's adapter dir, refused (RegistryError) when it lies outside `adapters_root`."""
        return self._check_adapter(version.id, version.adapter_path)

    def register(
        self,
        base_model: str,
        adapter_path: str | None,
        parent_id: str | None,
        data_version: str | None = None,
        config: dict[str, Any] | None = None,
        eval_result: dict[str, Any] | None = None,
    ) -> VersionInfo:
        self._check_adapter("(new)", adapter_path)
        with self.store.session() as session:
            n = session.scalar(select(func.count()).select_from(ModelVersion)) or 0
            row = ModelVersion(
                id=f"v{n + 1:04d}",
                parent_id=parent_id,
                base_model=base_model,
                adapter_path=adapter_path,
                data_version=data_version,
                config=config or {},
                eval_result=eval_result,
                status="candidate",
            )
            session.add(row)
            session.commit()
            return VersionInfo.of(row)

    def update(self, version_id: str, **fields: Any) -> VersionInfo:
        self._check_adapter(version_id, fields.get("adapter_path"))
        with self.store.session() as session:
            row = self._row(session, version_id)
            for name, value in fields.items():
                setattr(row, name, value)
            session.commit()
            return VersionInfo.of(row)

    def set_eval(self, version_id: str, eval_result: dict[str, Any], status: str) -> VersionInfo:
        with self.store.session() as session:
            row = self._row(session, version_id)
            row.eval_result, row.status = eval_result, status
            session.commit()
            return VersionInfo.of(row)

    def get(self, version_id: str) -> VersionInfo:
        with self.store.session() as session:
            return VersionInfo.of(self._row(session, version_id))

    def list(self) -> list[VersionInfo]:
        with self.store.session() as session:
            return [
                VersionInfo.of(r) for r in session.scalars(select(ModelVersion).order_by(ModelVersion.id))
            ]

    def current(self) -> VersionInfo | None:
        """The version `prefloop-current` serves; None = the base model."""
        with self.store.session() as session:
            last = session.scalars(select(Promotion).order_by(Promotion.id.desc()).limit(1)).first()
            if last is None or last.version_id is None:
                return None
            return VersionInfo.of(self._row(session, last.version_id))

    def history(self) -> list[tuple[datetime, str, str | None]]:
        with self.store.session() as session:
            rows = session.scalars(select(Promotion).order_by(Promotion.id))
            return [(p.created_at, p.action, p.version_id) for p in rows]

    def promote(self, version_id: str) -> VersionInfo:
        with self.store.session() as session:
            row = self._row(session, version_id)
            if row.adapter_path is None:
                raise RegistryError(f"version {version_id} has no adapter to serve")
            self._check_adapter(version_id, row.adapter_path)
            row.status, row.promoted_at = "promoted", utcnow()
            session.add(Promotion(version_id=version_id, action="promote"))
            session.commit()
            return VersionInfo.of(row)

    def rollback(self, to: str | None = None) -> VersionInfo | None:
        """Serve an earlier version again: `to`, or else the current version's parent in the lineage.
        Returns the version now current (None = the base model)."""
        current = self.current()
        if to is None and current is None:
            raise RegistryError("nothing to roll back: the base model is already current")
        target = to if to is not None else current.parent_id  # type: ignore[union-attr]
        with self.store.session() as session:
            if target is not None:
                self._row(session, target)  # must exist
            session.add(Promotion(version_id=target, action="rollback"))
            session.commit()
        return self.get(target) if target else None

    @staticmethod
    def _row(session: Any, version_id: str) -> ModelVersion:
        row = session.get(ModelVersion, version_id)
        if row is None:
            raise RegistryError(f"unknown model version {version_id!r}")
        return row
