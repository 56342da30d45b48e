"""Initial schema: completions, feedback, model registry.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "completions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("response_id", sa.String(64), nullable=False, index=True),
        sa.Column("choice_index", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("prompt_hash", sa.String(64), nullable=False, index=True),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(200), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("finish_reason", sa.String(32), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column(
            "completion_id", sa.String(64), sa.ForeignKey("completions.id"), nullable=False, index=True
        ),
        sa.Column("rejected_id", sa.String(64), sa.ForeignKey("completions.id"), nullable=True),
        sa.Column("value", sa.Integer, nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("corrected_response", sa.Text, nullable=True),
        sa.UniqueConstraint("idempotency_key", name="uq_feedback_idempotency_key"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("parent_id", sa.String(32), sa.ForeignKey("model_versions.id"), nullable=True),
        sa.Column("base_model", sa.String(500), nullable=False),
        sa.Column("adapter_path", sa.String(1000), nullable=True),
        sa.Column("data_version", sa.String(64), nullable=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("eval_result", sa.JSON, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("promoted_at", sa.DateTime, nullable=True),
    )
    op.create_table(
        "promotions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("version_id", sa.String(32), sa.ForeignKey("model_versions.id"), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("promotions")
    op.drop_table("model_versions")
    op.drop_table("feedback")
    op.drop_table("completions")
