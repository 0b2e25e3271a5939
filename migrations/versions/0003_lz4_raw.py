"""messages: compress raw and ack with lz4 on PostgreSQL when the server has it

pglz, the default, cost more server time per 20 KB consult note than the rest of the
commit; lz4 (PostgreSQL 14+, when built with it) is several times cheaper. SQLite and
servers without lz4 are left as they are: the schema is the same either way.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _has_lz4() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    found = bind.execute(
        sa.text(
            "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
            "AND 'lz4' = ANY(enumvals)"
        )
    ).first()
    return found is not None


def upgrade() -> None:
    if _has_lz4():
        op.execute("ALTER TABLE messages ALTER COLUMN raw SET COMPRESSION lz4")
        op.execute("ALTER TABLE messages ALTER COLUMN ack SET COMPRESSION lz4")


def downgrade() -> None:
    if _has_lz4():
        op.execute("ALTER TABLE messages ALTER COLUMN raw SET COMPRESSION pglz")
        op.execute("ALTER TABLE messages ALTER COLUMN ack SET COMPRESSION pglz")
