"""The feedback store and model registry, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import text

from serving import feedback_store as fs
from serving.registry import ModelRegistry, RegistryError


def _completion(cid: str, prompt: str = "hi", response: str = "hello") -> fs.Completion:
    messages = [{"role": "user", "content": prompt}]
    return fs.Completion(
        id=cid, response_id=cid.rsplit("-", 1)[0], choice_index=int(cid.rsplit("-", 1)[1]),
        prompt_hash=fs.prompt_hash(messages), prompt=messages, response=response, model="m", model_version="m",
        params={"temperature": 0}, finish_reason="stop", prompt_tokens=3, completion_tokens=2, latency_ms=1.5,
    )  # fmt: skip


def test_migrations_build_exactly_the_models_schema(store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), fs.Base.metadata) == []
        assert conn.execute(text("select version_num from alembic_version")).scalar() == "0001"
    store.migrate()  # idempotent


def test_sqlite_runs_in_wal_mode_and_fsyncs_every_commit(tmp_path: Path) -> None:
    store = fs.FeedbackStore(f"sqlite:///{tmp_path / 'wal.db'}")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL: survives power loss


def test_feedback_is_idempotent_and_validated(store) -> None:
    with store.session() as s:
        fs.log_completions(
            s, [_completion("r1-0"), _completion("r1-1", response="hey"), _completion("r2-0", prompt="other")]
        )
        item = fs.FeedbackInput("pairwise", "r1-0", rejected_id="r1-1", idempotency_key="k1")
        (first, created1), (again, created2) = fs.add_feedback(s, item), fs.add_feedback(s, item)
        assert (created1, created2) == (True, False) and first.id == again.id
        with pytest.raises(fs.FeedbackError, match="different payload") as conflict:
            fs.add_feedback(s, fs.FeedbackInput("pairwise", "r1-1", rejected_id="r1-0", idempotency_key="k1"))
        assert conflict.value.status == 409
        with pytest.raises(fs.FeedbackError, match="different prompts"):
            fs.add_feedback(s, fs.FeedbackInput("pairwise", "r1-0", rejected_id="r2-0"))
        with pytest.raises(fs.FeedbackError, match="unknown completion id") as unknown:
            fs.add_feedback(s, fs.FeedbackInput("thumbs", "missing", value=1))
        assert unknown.value.status == 404
        assert fs.counts(s) == {"completions": 3, "feedback": 1}


def test_concurrent_writers_lose_nothing_and_double_count_nothing(store) -> None:
    with store.session() as s:
        fs.log_completions(s, [_completion("c-0")])

    def write(i: int) -> bool:
        with store.session() as s:
            # Every write is sent twice, as a retrying client would.
            item = fs.FeedbackInput("rating", "c-0", value=1 + i % 5, idempotency_key=f"key-{i}")
            return fs.add_feedback(s, item)[1] + fs.add_feedback(s, item)[1] == 1

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(write, range(200)))
    with store.session() as s:
        assert fs.counts(s)["feedback"] == 200
        assert len(fs.feedback_with_completions(s)) == 200


def test_registry_lineage_promote_and_rollback(store) -> None:
    registry = ModelRegistry(store)
    assert registry.current() is None  # the base model
    v1 = registry.register(
        "tiny-random", "/a/v1", parent_id=None, data_version="v0001", config={"algorithm": "dpo"}
    )
    v2 = registry.register("tiny-random", "/a/v2", parent_id=v1.id, data_version="v0002")
    assert (v1.id, v2.id) == ("v0001", "v0002")
    registry.promote(v1.id)
    registry.promote(v2.id)
    assert registry.current().id == "v0002" and registry.get("v0002").status == "promoted"
    assert registry.rollback().id == "v0001"  # default: the current version's parent
    assert registry.rollback() is None  # v0001's parent is the base model
    assert registry.rollback(to="v0002").id == "v0002"
    assert [action for _, action, _ in registry.history()] == [
        "promote",
        "promote",
        "rollback",
        "rollback",
        "rollback",
    ]
    with pytest.raises(RegistryError, match="unknown model version"):
        registry.rollback(to="v0099")
    assert [v.parent_id for v in registry.list()] == [None, "v0001"]
