"""messages: every inbound message, raw, before its ACK

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from alembic import op
import sqlalchemy as sa

from engine.store.schema import Id, UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("received_at", UtcDateTime(), nullable=False),
        sa.Column("listener", sa.String(64), nullable=False),
        sa.Column("peer", sa.String(64), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("raw_truncated", sa.Boolean(), nullable=False),
        sa.Column("message_type", sa.String(), nullable=True),
        sa.Column("control_id", sa.String(), nullable=True),
        sa.Column("sending_application", sa.String(), nullable=True),
        sa.Column("sending_facility", sa.String(), nullable=True),
        sa.Column("receiving_application", sa.String(), nullable=True),
        sa.Column("receiving_facility", sa.String(), nullable=True),
        sa.Column("version", sa.String(), nullable=True),
        sa.Column("charset", sa.String(), nullable=True),
        sa.Column("dedup_key", sa.String(64), nullable=True),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("ack_code", sa.String(2), nullable=True),
        sa.Column("ack", sa.LargeBinary(), nullable=True),
        sa.Column("error_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duplicate_of", Id, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
    )
    op.create_index("ix_messages_dedup_key_received_at", "messages", ["dedup_key", "received_at"])
    op.create_index("ix_messages_status_id", "messages", ["status", "id"])
    op.create_index("ix_messages_received_at", "messages", ["received_at"])


def downgrade() -> None:
    op.drop_table("messages")
