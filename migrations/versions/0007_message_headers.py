"""messages.headers: the request headers that matter, kept with a FHIR resource's body

A FHIR write is stored raw like an HL7 message; the headers that change its meaning
(Content-Type, If-None-Exist, If-Match, X-Request-Id, a notification's subscription and
event number) are kept beside it as JSON. NULL for MLLP messages.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("headers", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("headers")
