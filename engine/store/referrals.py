"""Queries the command line reads: referrals, their timelines, parked messages.

The normaliser's write path is :mod:`engine.store.eventlog`; this is the browser side,
in SQLAlchemy Core, where a query per screen is cheap and clarity wins.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from engine.store.schema import messages, parked_keys, referral_events, referral_keys, referrals

_LIST = (
    referrals.c.id,
    referrals.c.state,
    referrals.c.placer_order_number,
    referrals.c.placer_assigner,
    referrals.c.referral_number,
    referrals.c.specialty,
    referrals.c.priority,
    referrals.c.created_at,
    referrals.c.updated_at,
    referrals.c.last_sequence,
    referrals.c.needs_review,
)


def list_referrals(
    conn: Connection,
    *,
    state: str | None = None,
    needs_review: bool = False,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Referrals, most recently changed first."""
    query = select(*_LIST).order_by(referrals.c.updated_at.desc(), referrals.c.id)
    if state:
        query = query.where(referrals.c.state == state)
    if needs_review:
        query = query.where(referrals.c.needs_review.is_(True))
    if limit is not None:
        query = query.limit(limit)
    for row in conn.execute(query):
        yield dict(row._mapping)


def find_referrals(conn: Connection, ref: str) -> list[dict[str, Any]]:
    """The referral with id ``ref``, else every referral with that placer order number."""
    row = conn.execute(select(referrals).where(referrals.c.id == ref)).first()
    if row is not None:
        return [_referral(dict(row._mapping))]
    rows = conn.execute(
        select(referrals).where(referrals.c.placer_order_number == ref).order_by(referrals.c.id)
    )
    return [_referral(dict(r._mapping)) for r in rows]


def _referral(row: dict[str, Any]) -> dict[str, Any]:
    row["data"] = json.loads(row["data"])
    return row


def timeline(conn: Connection, referral_id: str) -> list[dict[str, Any]]:
    """A referral's events in sequence, each with its source message's type and MSH-10."""
    query = (
        select(
            referral_events,
            messages.c.message_type,
            messages.c.control_id,
        )
        .select_from(
            referral_events.outerjoin(messages, messages.c.id == referral_events.c.message_id)
        )
        .where(referral_events.c.referral_id == referral_id)
        .order_by(referral_events.c.sequence)
    )
    out = []
    for row in conn.execute(query):
        item = dict(row._mapping)
        item["fields"] = json.loads(item["fields"])
        out.append(item)
    return out


def keys_of(conn: Connection, referral_id: str) -> list[dict[str, str]]:
    query = (
        select(referral_keys.c.kind, referral_keys.c.value, referral_keys.c.assigner)
        .where(referral_keys.c.referral_id == referral_id)
        .order_by(referral_keys.c.kind, referral_keys.c.value, referral_keys.c.assigner)
    )
    return [dict(r._mapping) for r in conn.execute(query)]


def events_of_message(conn: Connection, message_id: int) -> list[dict[str, Any]]:
    query = (
        select(
            referral_events.c.id,
            referral_events.c.referral_id,
            referral_events.c.sequence,
            referral_events.c.type,
            referral_events.c.anomaly,
        )
        .where(referral_events.c.message_id == message_id)
        .order_by(referral_events.c.recorded_at, referral_events.c.id)
    )
    return [dict(r._mapping) for r in conn.execute(query)]


def parked_messages(conn: Connection, statuses: Sequence[str]) -> list[dict[str, Any]]:
    """Parked and unmatched messages, oldest first, with the keys each waits for."""
    query = (
        select(
            messages.c.id,
            messages.c.received_at,
            messages.c.listener,
            messages.c.message_type,
            messages.c.control_id,
            messages.c.status,
            messages.c.parked_at,
            messages.c.attempts,
            messages.c.diagnostics,
        )
        .where(messages.c.status.in_(list(statuses)))
        .order_by(messages.c.id)
    )
    rows = [dict(r._mapping) for r in conn.execute(query)]
    if not rows:
        return rows
    waits: dict[int, list[str]] = {}
    keys = select(parked_keys).where(parked_keys.c.message_id.in_([r["id"] for r in rows]))
    for k in conn.execute(keys):
        assigner = f"^{k.assigner}" if k.assigner else ""
        waits.setdefault(k.message_id, []).append(f"{k.kind} {k.value}{assigner}")
    for r in rows:
        r["waits_for"] = sorted(waits.get(r["id"], []))
        r["diagnostics"] = json.loads(r["diagnostics"]) if r["diagnostics"] else []
    return rows


def select_for_replay(
    conn: Connection,
    *,
    ids: Sequence[int] = (),
    status: str | None = None,
    since: datetime | None = None,
    statuses: Sequence[str] = (),
) -> list[tuple[int, str]]:
    """(id, status) of the messages a replay names, in id order. ``statuses`` limits a
    selection by ``status``/``since`` to what can be normalised (ids are taken as given)."""
    query = select(messages.c.id, messages.c.status).order_by(messages.c.id)
    if ids:
        query = query.where(messages.c.id.in_(list(ids)))
    elif statuses:
        query = query.where(messages.c.status.in_(list(statuses)))
    if status:
        query = query.where(messages.c.status == status)
    if since is not None:
        query = query.where(messages.c.received_at >= since)
    return [(int(i), s) for i, s in conn.execute(query)]
