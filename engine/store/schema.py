"""Table definitions (SQLAlchemy Core). Alembic migrations must match these exactly;
``tests/integration/test_migrations.py`` proves it on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on both backends."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: Every inbound message, raw and untouched, committed before it is acknowledged.
messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("received_at", UtcDateTime(), nullable=False),
    Column("listener", String(64), nullable=False),
    Column("peer", String(64), nullable=False),
    Column("raw", LargeBinary(), nullable=False),
    Column("size", Integer(), nullable=False),
    Column("raw_truncated", Boolean(), nullable=False, default=False),
    Column("message_type", String(), nullable=True),
    Column("control_id", String(), nullable=True),
    Column("sending_application", String(), nullable=True),
    Column("sending_facility", String(), nullable=True),
    Column("receiving_application", String(), nullable=True),
    Column("receiving_facility", String(), nullable=True),
    Column("version", String(), nullable=True),
    Column("charset", String(), nullable=True),
    # sha256(MSH-3 | MSH-4 | MSH-10), only on accepted messages: what duplicates match.
    Column("dedup_key", String(64), nullable=True),
    Column("payload_sha256", String(64), nullable=False),
    Column("status", String(24), nullable=False),
    Column("ack_code", String(2), nullable=True),
    Column("ack", LargeBinary(), nullable=True),
    Column("error_code", Integer(), nullable=True),
    Column("error", Text(), nullable=True),
    Column("duplicate_of", Id, nullable=True),
    # Accepted messages only; resends are recognised by colliding here (engine/store/ingest.py).
    Index(
        "uq_messages_dedup_key",
        "dedup_key",
        unique=True,
        sqlite_where=text("dedup_key IS NOT NULL"),
        postgresql_where=text("dedup_key IS NOT NULL"),
    ),
    Index(None, "status", "id"),
    Index(None, "received_at"),
)
