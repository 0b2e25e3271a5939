"""fhir_subscriptions and fhir_followups: FHIR Subscription state and announced work

One row per source and Subscription (its id on the source's server, status, last event
number, when it was last heard from), and the read-backs and reconciliation searches
notifications announced, written before they are answered.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa

from engine.store.schema import Id, UtcDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fhir_subscriptions",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("key", sa.String(80), nullable=False),
        sa.Column("resource", sa.String(64), nullable=True),
        sa.Column("search", sa.String(), nullable=True),
        sa.Column("server_id", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("last_event_number", sa.BigInteger(), nullable=True),
        sa.Column("last_event_at", UtcDateTime(), nullable=True),
        sa.Column("last_heard_at", UtcDateTime(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_fhir_subscriptions"),
        sa.UniqueConstraint("source", "key", name="uq_fhir_subscriptions_source_key"),
    )
    op.create_index(
        "ix_fhir_subscriptions_source_server_id", "fhir_subscriptions", ["source", "server_id"]
    )
    op.create_table(
        "fhir_followups",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("since", UtcDateTime(), nullable=True),
        sa.Column("subscription_id", Id, nullable=True),
        sa.Column("reason", sa.String(24), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_fhir_followups"),
    )
    op.create_index("ix_fhir_followups_next_attempt_at", "fhir_followups", ["next_attempt_at"])


def downgrade() -> None:
    op.drop_table("fhir_followups")
    op.drop_table("fhir_subscriptions")
