"""The feedback store: every completion served, every piece of feedback, and the model registry.

SQLAlchemy 2.x models; SQLite in WAL mode by default (one file, concurrent readers, one writer),
PostgreSQL when given a `postgresql://` URL. The schema is created and upgraded by the alembic
migrations shipped in `serving/migrations/`, never by `create_all`, so a deployed database can be
upgraded in place. Functions take a `Session` so FastAPI routes can get one through `Depends`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column, sessionmaker

from alignment.paths import prefloop_home

MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # naive UTC: identical on SQLite and PostgreSQL


def prompt_hash(messages: list[dict[str, Any]]) -> str:
    """Identity of a prompt: feedback can only pair responses that share it."""
    canonical = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Base(DeclarativeBase):
    pass


class Completion(Base):
    """One choice of one chat completion, as served."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    response_id: Mapped[str] = mapped_column(String(64), index=True)
    choice_index: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    prompt_hash: Mapped[str] = mapped_column(String(64), index=True)
    prompt: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    response: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200), doc="The model name the client asked for.")
    model_version: Mapped[str] = mapped_column(String(200), doc="The version that actually answered.")
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    finish_reason: Mapped[str] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)


FeedbackKind = Literal["thumbs", "rating", "pairwise"]


class Feedback(Base):
    """A thumbs up/down (+1/-1), a 1-5 star rating, or a pairwise pick (completion_id beat rejected_id)."""

    __tablename__ = "feedback"
    # The idempotency guarantee lives in the database, so racing retries cannot both get in.
    __table_args__ = (UniqueConstraint("idempotency_key", name="uq_feedback_idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    payload_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    completion_id: Mapped[str] = mapped_column(ForeignKey("completions.id"), index=True)
    rejected_id: Mapped[str | None] = mapped_column(ForeignKey("completions.id"))
    value: Mapped[int | None] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    corrected_response: Mapped[str | None] = mapped_column(Text)


class ModelVersion(Base):
    """A trained adapter and where it came from (the registry's lineage)."""

    __tablename__ = "model_versions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))
    base_model: Mapped[str] = mapped_column(String(500))
    adapter_path: Mapped[str | None] = mapped_column(String(1000))
    data_version: Mapped[str | None] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    eval_result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="candidate")  # candidate|promoted|rejected
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime)


class Promotion(Base):
    """Append-only history of what `prefloop-current` pointed at; the last row is the current model."""

    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version_id: Mapped[str | None] = mapped_column(
        ForeignKey("model_versions.id"), doc="None = the base model."
    )
    action: Mapped[str] = mapped_column(String(16))  # promote|rollback
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# --- engine and migrations ----------------------------------------------------------------


def default_url() -> str:
    return f"sqlite:///{prefloop_home() / 'serving' / 'feedback.db'}"


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 (the driver prefloop installs), not SQLAlchemy's psycopg2 default."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer. FULL: the WAL is fsynced at every commit, so a rating
    # acknowledged with a 2xx survives a power loss, not only a crash of the process (NORMAL would
    # lose the last commits then); one fsync per write is cheap next to an HTTP round trip.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")  # concurrent writers wait instead of failing
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class FeedbackStore:
    """Owns the database engine and session factory; `migrate()` brings the schema to head."""

    def __init__(self, url: str | None = None, migrate: bool = True):
        self.url = normalize_url(url or default_url())
        parsed = make_url(self.url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(self.url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time; queueing writers on a lock here is much faster than
        # letting them collide and back off in SQLite's busy handler. PostgreSQL needs no such lock.
        self.write_lock: AbstractContextManager[Any] = (
            threading.Lock() if self.engine.dialect.name == "sqlite" else nullcontext()
        )
        if migrate:
            self.migrate()

    def migrate(self, revision: str = "head") -> None:
        from alembic import command

        command.upgrade(alembic_config(self.engine), revision)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()


def alembic_config(engine: Engine | None = None, url: str | None = None) -> Any:
    """An alembic Config pointing at the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url:
        config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    config.attributes["engine"] = engine
    return config


# --- completions --------------------------------------------------------------------------


def log_completions(session: Session, rows: list[Completion]) -> None:
    session.add_all(rows)
    session.commit()


def find_completion(session: Session, completion_id: str) -> Completion | None:
    """By choice id; a response id also works when that response had a single choice."""
    if row := session.get(Completion, completion_id):
        return row
    rows = session.scalars(select(Completion).where(Completion.response_id == completion_id).limit(2)).all()
    return rows[0] if len(rows) == 1 else None


# --- feedback -----------------------------------------------------------------------------


class FeedbackError(ValueError):
    """Feedback that cannot be accepted; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(frozen=True)
class FeedbackInput:
    kind: FeedbackKind
    completion_id: str
    rejected_id: str | None = None
    value: int | None = None
    comment: str | None = None
    corrected_response: str | None = None
    idempotency_key: str | None = None

    def payload_hash(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if k != "idempotency_key"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _resolve_ids(session: Session, item: FeedbackInput) -> tuple[str, str | None]:
    chosen = find_completion(session, item.completion_id)
    if chosen is None:
        raise FeedbackError(f"unknown completion id {item.completion_id!r}", 404, "completion_id")
    if item.kind != "pairwise":
        return chosen.id, None
    assert item.rejected_id is not None
    rejected = find_completion(session, item.rejected_id)
    if rejected is None:
        raise FeedbackError(f"unknown completion id {item.rejected_id!r}", 404, "rejected_id")
    if rejected.id == chosen.id:
        raise FeedbackError("a pairwise pick needs two different completions", 400, "rejected_id")
    if rejected.prompt_hash != chosen.prompt_hash:
        raise FeedbackError(
            f"completions {chosen.id!r} and {rejected.id!r} answer different prompts; "
            "a pairwise pick compares responses to the same prompt",
            400,
            "rejected_id",
        )
    return chosen.id, rejected.id


def add_feedback(session: Session, item: FeedbackInput) -> tuple[Feedback, bool]:
    """Store feedback once. Returns (row, created); a retry with the same idempotency key returns
    the original row, and the same key with a different payload is a conflict (409)."""
    digest = item.payload_hash()
    if item.idempotency_key and (existing := _by_key(session, item.idempotency_key)):
        return _replay(existing, digest)
    chosen_id, rejected_id = _resolve_ids(session, item)
    row = Feedback(
        idempotency_key=item.idempotency_key,
        payload_hash=digest,
        kind=item.kind,
        completion_id=chosen_id,
        rejected_id=rejected_id,
        value=item.value,
        comment=item.comment,
        corrected_response=item.corrected_response,
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        # Two retries raced past the lookup above; the unique constraint let exactly one in.
        session.rollback()
        if item.idempotency_key and (existing := _by_key(session, item.idempotency_key)):
            return _replay(existing, digest)
        raise
    return row, True


def _by_key(session: Session, key: str) -> Feedback | None:
    return session.scalars(select(Feedback).where(Feedback.idempotency_key == key)).first()


def _replay(existing: Feedback, digest: str) -> tuple[Feedback, bool]:
    if existing.payload_hash != digest:
        raise FeedbackError(
            f"idempotency key {existing.idempotency_key!r} was already used with a different payload",
            409,
            "idempotency_key",
        )
    return existing, False


def feedback_with_completions(session: Session) -> list[tuple[Feedback, Completion, Completion | None]]:
    """All feedback in id order, with the completion(s) it refers to (what ingest reads)."""
    rejected = aliased(Completion)
    stmt = (
        select(Feedback, Completion, rejected)
        .join(Completion, Feedback.completion_id == Completion.id)
        .outerjoin(rejected, Feedback.rejected_id == rejected.id)
        .order_by(Feedback.id)
    )
    return [(f, c, r) for f, c, r in session.execute(stmt)]


def counts(session: Session) -> dict[str, int]:
    from sqlalchemy import func

    return {
        "completions": session.scalar(select(func.count()).select_from(Completion)) or 0,
        "feedback": session.scalar(select(func.count()).select_from(Feedback)) or 0,
    }
