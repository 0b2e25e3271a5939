"""referral_timers, worklist_items, worklist_actions, patient_preferences: referral policy

Durable policy timers armed and cleared with the events that cause them, the exception
worklist and its audit trail, and patient outreach preferences learnt after the referral
(an SMS STOP).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa

from engine.store.schema import Id, UtcDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "referral_timers",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("referral_id", sa.String(36), nullable=False),
        sa.Column("rule", sa.String(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("entry", sa.Integer(), nullable=False),
        sa.Column("entered_at", UtcDateTime(), nullable=False),
        sa.Column("due_at", UtcDateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name="fk_referral_timers_referral_id_referrals"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_referral_timers"),
    )
    op.create_index("ix_referral_timers_status_due_at", "referral_timers", ["status", "due_at"])
    op.create_index(
        "ix_referral_timers_referral_id_status", "referral_timers", ["referral_id", "status"]
    )
    op.create_table(
        "worklist_items",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(36), nullable=False),
        sa.Column("referral_id", sa.String(36), nullable=True),
        sa.Column("message_id", Id, nullable=True),
        sa.Column("reason", sa.String(48), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("assignee", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("state", sa.String(24), nullable=True),
        sa.Column("due_at", UtcDateTime(), nullable=True),
        sa.Column("snoozed_until", UtcDateTime(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("resolved_at", UtcDateTime(), nullable=True),
        sa.Column("resolved_by", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name="fk_worklist_items_referral_id_referrals"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_worklist_items"),
        sa.UniqueConstraint("key", name="uq_worklist_items_key"),
    )
    op.create_index("ix_worklist_items_status_reason", "worklist_items", ["status", "reason"])
    op.create_index(
        "ix_worklist_items_referral_id_status", "worklist_items", ["referral_id", "status"]
    )
    op.create_table(
        "worklist_actions",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("item_id", Id, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["item_id"], ["worklist_items.id"], name="fk_worklist_actions_item_id_worklist_items"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_worklist_actions"),
    )
    op.create_index("ix_worklist_actions_item_id", "worklist_actions", ["item_id"])
    op.create_table(
        "patient_preferences",
        sa.Column("patient_key", sa.String(), nullable=False),
        sa.Column("sms_consent", sa.Boolean(), nullable=True),
        sa.Column("email_consent", sa.Boolean(), nullable=True),
        sa.Column("language", sa.String(16), nullable=True),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("patient_key", name="pk_patient_preferences"),
    )


def downgrade() -> None:
    op.drop_table("patient_preferences")
    op.drop_table("worklist_actions")
    op.drop_table("worklist_items")
    op.drop_table("referral_timers")
