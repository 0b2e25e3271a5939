"""referrals: the event log, the projection, correlation keys, parked messages

Messages gain what normalisation decided (status processed / ignored / mapping_error /
parked / unmatched, diagnostics, the mapping and rule, when it was parked, attempts).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from alembic import op
import sqlalchemy as sa

from engine.store.schema import Id, UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("normalised_at", UtcDateTime(), nullable=True))
        batch.add_column(sa.Column("diagnostics", sa.Text(), nullable=True))
        batch.add_column(sa.Column("mapping_id", sa.String(), nullable=True))
        batch.add_column(sa.Column("rule_id", sa.String(), nullable=True))
        batch.add_column(sa.Column("parked_at", UtcDateTime(), nullable=True))
        batch.add_column(
            sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )

    op.create_table(
        "referrals",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("placer_order_number", sa.String(), nullable=True),
        sa.Column("placer_assigner", sa.String(), nullable=True),
        sa.Column("referral_number", sa.String(), nullable=True),
        sa.Column("specialty", sa.String(), nullable=True),
        sa.Column("priority", sa.String(), nullable=True),
        sa.Column("patient_key", sa.String(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("last_sequence", sa.Integer(), nullable=False),
        sa.Column("needs_review", sa.Boolean(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_referrals"),
    )
    op.create_index("ix_referrals_state_updated_at", "referrals", ["state", "updated_at"])
    op.create_index("ix_referrals_placer_order_number", "referrals", ["placer_order_number"])
    op.create_index("ix_referrals_patient_key_state", "referrals", ["patient_key", "state"])

    op.create_table(
        "referral_events",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("referral_id", sa.String(36), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("occurred_at", UtcDateTime(), nullable=True),
        sa.Column("recorded_at", UtcDateTime(), nullable=False),
        sa.Column("message_id", Id, nullable=True),
        sa.Column("mapping_id", sa.String(), nullable=True),
        sa.Column("mapping_digest", sa.String(), nullable=True),
        sa.Column("rule_id", sa.String(), nullable=True),
        sa.Column("correlation_method", sa.String(24), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("state_before", sa.String(24), nullable=True),
        sa.Column("state_after", sa.String(24), nullable=True),
        sa.Column("anomaly", sa.Text(), nullable=True),
        sa.Column("fields", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_referral_events"),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name="fk_referral_events_referral_id_referrals"
        ),
        sa.UniqueConstraint(
            "referral_id", "sequence", name="uq_referral_events_referral_id_sequence"
        ),
    )
    op.create_index("ix_referral_events_message_id", "referral_events", ["message_id"])
    op.create_index("ix_referral_events_recorded_at", "referral_events", ["recorded_at"])

    op.create_table(
        "referral_keys",
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.Column("assigner", sa.String(), nullable=False),
        sa.Column("referral_id", sa.String(36), nullable=False),
        sa.PrimaryKeyConstraint(
            "value", "kind", "assigner", "referral_id", name="pk_referral_keys"
        ),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name="fk_referral_keys_referral_id_referrals"
        ),
    )
    op.create_index("ix_referral_keys_referral_id", "referral_keys", ["referral_id"])

    op.create_table(
        "parked_keys",
        sa.Column("message_id", Id, nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.Column("assigner", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("message_id", "kind", "value", "assigner", name="pk_parked_keys"),
    )
    op.create_index("ix_parked_keys_value", "parked_keys", ["value"])


def downgrade() -> None:
    op.drop_table("parked_keys")
    op.drop_table("referral_keys")
    op.drop_table("referral_events")
    op.drop_table("referrals")
    with op.batch_alter_table("messages") as batch:
        for column in ("attempts", "parked_at", "rule_id", "mapping_id", "diagnostics"):
            batch.drop_column(column)
        batch.drop_column("normalised_at")
