"""Queries over the ``messages`` table: the writer's batch insert and dedup lookup, and
what the message browser reads."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select

from engine.store.schema import messages


@dataclass(frozen=True, slots=True)
class Original:
    """What a duplicate needs from the message it repeats."""

    id: int
    received_at: datetime
    ack: bytes | None
    payload_sha256: str


def find_originals(conn: Connection, keys: Iterable[str], since: datetime) -> dict[str, Original]:
    """Accepted messages with these dedup keys received at or after ``since``."""
    wanted = list(set(keys))
    if not wanted:
        return {}
    rows = conn.execute(
        select(
            messages.c.id,
            messages.c.received_at,
            messages.c.dedup_key,
            messages.c.ack,
            messages.c.payload_sha256,
        )
        .where(messages.c.dedup_key.in_(wanted), messages.c.received_at >= since)
        .order_by(messages.c.id)
    )
    found: dict[str, Original] = {}
    for row in rows:
        found.setdefault(
            row.dedup_key, Original(row.id, row.received_at, row.ack, row.payload_sha256)
        )
    return found


def insert_messages(conn: Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert rows in order and return their ids in the same order."""
    if not rows:
        return []
    result = conn.execute(
        insert(messages).returning(messages.c.id, sort_by_parameter_order=True), list(rows)
    )
    return [row.id for row in result]


@dataclass(frozen=True, slots=True)
class MessageFilter:
    status: str | None = None
    message_type: str | None = None  # "ORM" or "ORM^O01"
    since: datetime | None = None
    listener: str | None = None
    limit: int | None = None


_SUMMARY = (
    messages.c.id,
    messages.c.received_at,
    messages.c.listener,
    messages.c.peer,
    messages.c.control_id,
    messages.c.message_type,
    messages.c.sending_application,
    messages.c.sending_facility,
    messages.c.status,
    messages.c.ack_code,
    messages.c.error_code,
    messages.c.error,
    messages.c.size,
)


def list_messages(conn: Connection, flt: MessageFilter) -> Iterator[dict[str, Any]]:
    query = select(*_SUMMARY).order_by(messages.c.id)
    if flt.status:
        query = query.where(messages.c.status == flt.status)
    if flt.listener:
        query = query.where(messages.c.listener == flt.listener)
    if flt.since:
        query = query.where(messages.c.received_at >= flt.since)
    if flt.message_type:
        pattern = flt.message_type.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(
            (messages.c.message_type == flt.message_type)
            | messages.c.message_type.like(pattern + "^%", escape="\\")
        )
    if flt.limit is not None:
        query = query.limit(flt.limit)
    for row in conn.execute(query):
        yield dict(row._mapping)


def get_message(conn: Connection, message_id: int) -> dict[str, Any] | None:
    row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
    return dict(row._mapping) if row else None


def control_ids_with_status(conn: Connection, status: str) -> set[str]:
    rows = conn.execute(select(messages.c.control_id).where(messages.c.status == status))
    return {r.control_id for r in rows}
