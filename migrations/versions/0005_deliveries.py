"""deliveries: the transactional outbox of outbound packets and write-backs

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa

from engine.store.schema import Id, UtcDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(36), nullable=False),
        sa.Column("referral_id", sa.String(36), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("route_id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("format", sa.String(40), nullable=False),
        sa.Column("endpoint", sa.String(), nullable=True),
        sa.Column("recipient_id", sa.String(), nullable=True),
        sa.Column("receiver_application", sa.String(), nullable=True),
        sa.Column("receiver_facility", sa.String(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
        sa.Column("age_from", UtcDateTime(), nullable=False),
        sa.Column("claimed_at", UtcDateTime(), nullable=True),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("finished_at", UtcDateTime(), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("content_type", sa.String(64), nullable=True),
        sa.Column("meta", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("receipt", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.UniqueConstraint("key", name="uq_deliveries_key"),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name="fk_deliveries_referral_id_referrals"
        ),
    )
    op.create_index(
        "ix_deliveries_status_next_attempt_at", "deliveries", ["status", "next_attempt_at"]
    )
    op.create_index(
        "ix_deliveries_referral_id_channel_id", "deliveries", ["referral_id", "channel", "id"]
    )
    op.create_index("ix_deliveries_channel_status", "deliveries", ["channel", "status"])


def downgrade() -> None:
    op.drop_table("deliveries")
