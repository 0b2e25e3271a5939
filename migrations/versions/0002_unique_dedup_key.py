"""messages: a partial unique index on dedup_key replaces the plain (dedup_key, received_at)

The unique index lets a batch insert recognise resends in the same statement, and makes
duplicate detection safe when several replicas share one PostgreSQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Keys duplicated under 0001 (a cross-replica race) keep only their first holder.
    op.execute(
        "UPDATE messages SET dedup_key = NULL WHERE dedup_key IS NOT NULL AND id NOT IN "
        "(SELECT MIN(id) FROM messages WHERE dedup_key IS NOT NULL GROUP BY dedup_key)"
    )
    op.drop_index("ix_messages_dedup_key_received_at", table_name="messages")
    op.create_index(
        "uq_messages_dedup_key",
        "messages",
        ["dedup_key"],
        unique=True,
        sqlite_where=sa.text("dedup_key IS NOT NULL"),
        postgresql_where=sa.text("dedup_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_messages_dedup_key", table_name="messages")
    op.create_index("ix_messages_dedup_key_received_at", "messages", ["dedup_key", "received_at"])
