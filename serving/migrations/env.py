"""Alembic environment for the feedback store.

Runs against the engine `FeedbackStore` passes in `config.attributes["engine"]`, or against
`sqlalchemy.url` when invoked from the alembic command line.
"""

from alembic import context
from sqlalchemy import create_engine

from serving.feedback_store import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine") or create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        # batch mode: SQLite cannot ALTER most things in place; alembic rebuilds the table instead.
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
