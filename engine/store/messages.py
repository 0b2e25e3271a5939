"""Queries over the ``messages`` table that the message browser and tools read.

The ingest writer's batch insert lives in :mod:`engine.store.ingest`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from engine.store.schema import messages


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
    messages.c.normalised_at,
    messages.c.mapping_id,
    messages.c.rule_id,
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
