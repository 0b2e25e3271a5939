"""FHIR subscription state and the follow-up work notifications announce.

``fhir_subscriptions`` holds, per source and Subscription, what the heartbeat watchdog
and gap detection need: the Subscription's id on the source's server, its status, the
last event number seen and when we last heard from it. ``fhir_followups`` is a small
durable queue of read-backs and reconciliation searches: a notification's follow-ups
are written before it is answered and deleted once done, so a crash between the answer
and the work loses nothing. Claiming pushes ``next_attempt_at`` out by a lease, so two
replicas rarely do the same work twice (and doing it twice stores duplicates only).

SQLAlchemy Core on a :class:`~sqlalchemy.Connection`; the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, case, delete, insert, select, update

from engine.store.schema import fhir_followups, fhir_subscriptions


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    id: int
    source: str
    key: str
    resource: str | None
    search: str | None
    server_id: str | None
    status: str | None
    last_event_number: int | None
    last_event_at: datetime | None
    last_heard_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Followup:
    id: int
    source: str
    kind: str  # read | reconcile
    target: str
    since: datetime | None
    subscription_id: int | None
    reason: str
    attempts: int  # including the claim that returned it


@dataclass(frozen=True, slots=True)
class NewFollowup:
    source: str
    kind: str
    target: str
    reason: str
    since: datetime | None = None
    subscription_id: int | None = None


def _state(row: Any) -> SubscriptionState:
    m = row._mapping
    return SubscriptionState(
        id=int(m["id"]),
        source=m["source"],
        key=m["key"],
        resource=m["resource"],
        search=m["search"],
        server_id=m["server_id"],
        status=m["status"],
        last_event_number=None if m["last_event_number"] is None else int(m["last_event_number"]),
        last_event_at=m["last_event_at"],
        last_heard_at=m["last_heard_at"],
        created_at=m["created_at"],
    )


def ensure_subscription(
    conn: Connection,
    source: str,
    key: str,
    *,
    now: datetime,
    resource: str | None = None,
    search: str | None = None,
    server_id: str | None = None,
) -> SubscriptionState:
    """The row for ``(source, key)``, created when missing; ``resource`` and ``search``
    are kept current when given (a changed spec gets a new key, so they rarely move)."""
    t = fhir_subscriptions
    found = get_subscription(conn, source, key)
    if found is None:
        conn.execute(
            insert(t).values(
                source=source,
                key=key,
                resource=resource,
                search=search,
                server_id=server_id,
                created_at=now,
                updated_at=now,
            )
        )
    else:
        values: dict[str, Any] = {}
        if resource is not None and resource != found.resource:
            values["resource"] = resource
        if search is not None and search != found.search:
            values["search"] = search
        if server_id is not None and found.server_id is None:
            values["server_id"] = server_id
        if not values:
            return found
        conn.execute(update(t).where(t.c.id == found.id).values(updated_at=now, **values))
    state = get_subscription(conn, source, key)
    assert state is not None
    return state


def get_subscription(conn: Connection, source: str, key: str) -> SubscriptionState | None:
    t = fhir_subscriptions
    row = conn.execute(select(t).where(t.c.source == source, t.c.key == key)).first()
    return _state(row) if row is not None else None


def subscription_by_id(conn: Connection, state_id: int) -> SubscriptionState | None:
    t = fhir_subscriptions
    row = conn.execute(select(t).where(t.c.id == state_id)).first()
    return _state(row) if row is not None else None


def subscription_by_server_id(
    conn: Connection, source: str, server_id: str
) -> SubscriptionState | None:
    t = fhir_subscriptions
    row = conn.execute(
        select(t).where(t.c.source == source, t.c.server_id == server_id).order_by(t.c.id)
    ).first()
    return _state(row) if row is not None else None


def list_subscriptions(conn: Connection, source: str | None = None) -> list[SubscriptionState]:
    t = fhir_subscriptions
    query = select(t).order_by(t.c.source, t.c.id)
    if source is not None:
        query = query.where(t.c.source == source)
    return [_state(row) for row in conn.execute(query)]


def set_server(
    conn: Connection, state_id: int, *, server_id: str | None, status: str | None, now: datetime
) -> None:
    """The Subscription as the server now holds it (created, refreshed or read back)."""
    t = fhir_subscriptions
    conn.execute(
        update(t)
        .where(t.c.id == state_id)
        .values(server_id=server_id, status=status, updated_at=now)
    )


def restart_count(conn: Connection, state_id: int, number: int | None, now: datetime) -> None:
    """A new Subscription on the server counts events from scratch."""
    t = fhir_subscriptions
    conn.execute(
        update(t).where(t.c.id == state_id).values(last_event_number=number, updated_at=now)
    )


def record_contact(
    conn: Connection,
    state_id: int,
    *,
    heard_at: datetime,
    event: bool,
    number: int | None = None,
    restart: bool = False,
    status: str | None = None,
) -> None:
    """A notification from this Subscription was handled.

    ``number`` only ever moves the last event number up (two notifications handled at
    once must not move it back), unless ``restart`` (a handshake) sets it outright."""
    t = fhir_subscriptions
    values: dict[str, Any] = {"last_heard_at": heard_at, "updated_at": heard_at}
    if event:
        values["last_event_at"] = heard_at
    if status is not None:
        values["status"] = status
    if number is not None:
        values["last_event_number"] = (
            number
            if restart
            else case(
                (t.c.last_event_number.is_(None), number),
                (t.c.last_event_number < number, number),
                else_=t.c.last_event_number,
            )
        )
    conn.execute(update(t).where(t.c.id == state_id).values(**values))


# -- follow-ups -------------------------------------------------------------------------


def add_followups(conn: Connection, items: Sequence[NewFollowup], now: datetime) -> None:
    if not items:
        return
    conn.execute(
        insert(fhir_followups),
        [
            {
                "source": f.source,
                "kind": f.kind,
                "target": f.target,
                "since": f.since,
                "subscription_id": f.subscription_id,
                "reason": f.reason,
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": now,
                "last_error": None,
            }
            for f in items
        ],
    )


def claim_followups(
    conn: Connection, now: datetime, *, lease: timedelta, limit: int = 32
) -> list[Followup]:
    """Due follow-ups, oldest first, each pushed ``lease`` into the future so nobody else
    takes it while it runs (a worker that dies gives it back when the lease ends)."""
    t = fhir_followups
    rows = conn.execute(
        select(t.c.id, t.c.next_attempt_at)
        .where(t.c.next_attempt_at <= now)
        .order_by(t.c.next_attempt_at, t.c.id)
        .limit(limit)
    ).all()
    claimed: list[int] = []
    for row_id, due in rows:
        taken = conn.execute(
            update(t)
            .where(t.c.id == row_id, t.c.next_attempt_at == due)
            .values(next_attempt_at=now + lease, attempts=t.c.attempts + 1)
        )
        if taken.rowcount:
            claimed.append(int(row_id))
    if not claimed:
        return []
    out = conn.execute(select(t).where(t.c.id.in_(claimed)).order_by(t.c.id))
    return [
        Followup(
            id=int(m["id"]),
            source=m["source"],
            kind=m["kind"],
            target=m["target"],
            since=m["since"],
            subscription_id=None if m["subscription_id"] is None else int(m["subscription_id"]),
            reason=m["reason"],
            attempts=int(m["attempts"]),
        )
        for m in (r._mapping for r in out)
    ]


def finish_followup(conn: Connection, followup_id: int) -> None:
    conn.execute(delete(fhir_followups).where(fhir_followups.c.id == followup_id))


def postpone_followup(conn: Connection, followup_id: int, *, until: datetime, error: str) -> None:
    t = fhir_followups
    conn.execute(
        update(t).where(t.c.id == followup_id).values(next_attempt_at=until, last_error=error)
    )


def count_followups(conn: Connection, source: str | None = None) -> int:
    t = fhir_followups
    query = select(t.c.id)
    if source is not None:
        query = query.where(t.c.source == source)
    return len(conn.execute(query).all())
