"""The outbox's side of the store: deliveries written with their cause, claimed, finished.

Theory of operation
-------------------
A delivery row is inserted by the same transaction that appends the event causing it
(:meth:`engine.store.eventlog.EventLog.write`, with ``ON CONFLICT (key) DO NOTHING``:
the key is derived from the event and the route, so a replayed message enqueues nothing
twice). From then on it is the dispatcher's:

* **claim** — ``pending`` rows that are due, oldest first, whose referral has no older
  open row on the same channel (per-referral FIFO per channel: a status update never
  overtakes the one before it, while a dead fax does not block the MLLP feed). On
  PostgreSQL the rows are locked with ``FOR UPDATE SKIP LOCKED`` so any number of
  replicas claim disjoint sets; on SQLite the write lock (``BEGIN IMMEDIATE``) does it.
  Claiming marks them ``in_flight`` with the claimer and the time, and counts the attempt.
* **finish** — the outcome and the events it becomes commit together (the dispatcher
  runs both in one transaction, holding the event log's turn); a failure that will be
  retried goes back to ``pending`` with its next time.
* **reclaim** — an ``in_flight`` row whose claimer has not finished within the lease
  (it crashed, or lost its database) goes back to ``pending``. The send may have
  happened: deliveries are at-least-once, and the idempotency key (MLLP MSH-10, the
  ``Idempotency-Key`` header, the e-mail Message-ID) lets the peer drop the repeat.

SQL is constant text on the driver connection, as in :mod:`engine.store.eventlog`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.store.driver import DriverQueries
from engine.store.schema import DELIVERY_OPEN

_INSERT_COLUMNS = (
    "key",
    "referral_id",
    "event_id",
    "route_id",
    "kind",
    "channel",
    "format",
    "endpoint",
    "recipient_id",
    "receiver_application",
    "receiver_facility",
    "status",
    "attempts",
    "created_at",
    "updated_at",
    "next_attempt_at",
    "age_from",
)
COLUMNS = (
    "id",
    *_INSERT_COLUMNS,
    "claimed_at",
    "claimed_by",
    "finished_at",
    "payload",
    "content_type",
    "meta",
    "last_error",
    "receipt",
)
_OPEN = ", ".join(f"'{s}'" for s in DELIVERY_OPEN)
#: Candidates read per delivery wanted: heads of their referrals' queues are among them.
CANDIDATES = 4


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A delivery to enqueue (from routing), written beside its trigger event."""

    key: str
    referral_id: str
    event_id: str
    route_id: str
    kind: str
    channel: str
    format: str
    endpoint: str = ""
    recipient_id: str = ""
    receiver_application: str = ""
    receiver_facility: str = ""


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    key: str
    referral_id: str
    event_id: str
    route_id: str
    kind: str
    channel: str
    format: str
    endpoint: str
    recipient_id: str
    receiver_application: str
    receiver_facility: str
    status: str
    attempts: int
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime
    age_from: datetime
    claimed_at: datetime | None
    claimed_by: str | None
    finished_at: datetime | None
    payload: bytes | None
    content_type: str | None
    meta: dict[str, str]
    last_error: str | None
    receipt: dict[str, Any] | None

    def summary(self) -> dict[str, Any]:
        """JSON-able, without the payload (PHI): what ``deliveries list`` shows."""
        return {
            "id": self.id,
            "status": self.status,
            "channel": self.channel,
            "kind": self.kind,
            "format": self.format,
            "route": self.route_id,
            "referral_id": self.referral_id,
            "recipient": self.recipient_id or None,
            "attempts": self.attempts,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "next_attempt_at": self.next_attempt_at.isoformat()
            if self.status == "pending"
            else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "last_error": self.last_error,
            "receipt": self.receipt,
            "idempotency_key": self.key,
        }


@dataclass(frozen=True, slots=True)
class SourceEvent:
    """The trigger event as the log holds it, and the message it came from."""

    id: str
    referral_id: str
    sequence: int
    type: str
    occurred_at: datetime
    fields: dict[str, Any]
    state_before: str | None
    state_after: str | None
    message_id: int | None


class Outbox(DriverQueries):
    """Outbox queries on one DBAPI connection (psycopg 3 or sqlite3)."""

    def __init__(self, dbapi_connection: Any, dialect: str) -> None:
        super().__init__(dbapi_connection, dialect)
        m = self.mark
        among = self.among

        cols = ", ".join(COLUMNS)
        lock = "" if self.sqlite else " FOR UPDATE OF d SKIP LOCKED"
        self.sql = {
            "insert": f"INSERT INTO deliveries ({', '.join(_INSERT_COLUMNS)}) VALUES "
            f"({', '.join([m] * len(_INSERT_COLUMNS))}) ON CONFLICT (key) DO NOTHING",
            # Candidates first, by the (status, next_attempt_at) index, a few more than
            # wanted; the FIFO check then looks at just their referrals ("heads"). One
            # query with the check inside costs the square of the queue on a table the
            # planner has no statistics for yet (a fresh outbox under a burst).
            "due": f"SELECT d.id, d.referral_id, d.channel FROM deliveries d "
            f"WHERE d.status = 'pending' AND d.next_attempt_at <= {m} "
            f"AND {among('d.channel')} ORDER BY d.id LIMIT {m}{lock}",
            "heads": f"SELECT referral_id, channel, MIN(id) FROM deliveries "
            f"WHERE status IN ({_OPEN}) AND {among('referral_id')} "
            "GROUP BY referral_id, channel",
            "claim": f"UPDATE deliveries SET status = 'in_flight', claimed_at = {m}, "
            f"claimed_by = {m}, attempts = attempts + 1, updated_at = {m} "
            f"WHERE {among('id')}",
            "get": f"SELECT {cols} FROM deliveries WHERE {among('id')} ORDER BY id",
            # Never a row its own claimer still works on: a live dispatcher knows its
            # own, and only another (dead) one's rows can be stalled.
            "reclaim": "UPDATE deliveries SET status = 'pending', claimed_by = NULL "
            f"WHERE status = 'in_flight' AND claimed_at < {m} AND claimed_by <> {m}",
            "render": f"UPDATE deliveries SET payload = {m}, content_type = {m}, meta = {m} "
            f"WHERE id = {m}",
            "finish": f"UPDATE deliveries SET status = {m}, updated_at = {m}, finished_at = {m}, "
            f"last_error = {m}, receipt = {m}, claimed_by = NULL WHERE id = {m} "
            "AND status = 'in_flight'",
            "later": f"UPDATE deliveries SET status = 'pending', updated_at = {m}, "
            f"next_attempt_at = {m}, last_error = {m}, claimed_by = NULL WHERE id = {m} "
            "AND status = 'in_flight'",
            # CAST: PostgreSQL cannot infer the type of a parameter only compared to NULL.
            "list": f"SELECT {cols} FROM deliveries WHERE (CAST({m} AS TEXT) IS NULL OR "
            f"status = {m}) AND (CAST({m} AS TEXT) IS NULL OR channel = {m}) "
            f"AND (CAST({m} AS TEXT) IS NULL OR referral_id = {m}) "
            f"ORDER BY id DESC LIMIT {m}",
            "retry": f"UPDATE deliveries SET status = 'pending', attempts = 0, "
            f"next_attempt_at = {m}, age_from = {m}, updated_at = {m}, finished_at = NULL "
            f"WHERE {among('id')} AND status IN ('dead', 'pending', 'cancelled')",
            "dead_ids": "SELECT id FROM deliveries WHERE status = 'dead' ORDER BY id",
            "cancel": f"UPDATE deliveries SET status = 'cancelled', updated_at = {m}, "
            f"finished_at = {m} WHERE id = {m} AND status IN ('pending', 'dead')",
            # Patient outreach stops the moment the appointment is booked: what is still
            # waiting is cancelled in the booking's transaction (in flight is let finish).
            "cancel_kind": f"UPDATE deliveries SET status = 'cancelled', updated_at = {m}, "
            f"finished_at = {m}, last_error = {m} WHERE kind = {m} AND status = 'pending' "
            f"AND {self.among('referral_id')}",
            "counts": "SELECT channel, status, COUNT(*) FROM deliveries "
            "WHERE status IN ('pending', 'in_flight', 'dead') GROUP BY channel, status",
            "event": "SELECT id, referral_id, sequence, type, occurred_at, fields, state_before, "
            f"state_after, message_id FROM referral_events WHERE id = {m}",
            "created_message": "SELECT message_id FROM referral_events WHERE referral_id = "
            f"{m} AND type = 'referral.created' AND message_id IS NOT NULL "
            "ORDER BY sequence LIMIT 1",
            "raw": f"SELECT id, raw, charset, message_type FROM messages WHERE {among('id')}",
        }
        self.sql["lock"] = "BEGIN IMMEDIATE" if self.sqlite else ""

    # -- transactions --------------------------------------------------------------------

    def begin(self) -> None:
        self.conn.rollback()
        if self.sqlite:
            self._exec("lock")

    def commit(self) -> None:
        self.conn.commit()

    def end(self) -> None:
        self.conn.rollback()

    # -- writes inside another transaction (the event log's) -----------------------------

    def insert(self, cur: Any, rows: Sequence[NewDelivery], now: datetime) -> None:
        """Enqueue ``rows`` on ``cur`` (the caller's open transaction)."""
        stamp = self._stamp(now)
        cur.executemany(
            self.sql["insert"],
            [
                (
                    r.key,
                    r.referral_id,
                    r.event_id,
                    r.route_id,
                    r.kind,
                    r.channel,
                    r.format,
                    r.endpoint or None,
                    r.recipient_id or None,
                    r.receiver_application or None,
                    r.receiver_facility or None,
                    "pending",
                    0,
                    stamp,
                    stamp,
                    stamp,
                    stamp,
                )
                for r in rows
            ],
        )

    # -- the dispatcher ------------------------------------------------------------------

    def claim(
        self, now: datetime, worker: str, limit: int, channels: Iterable[str]
    ) -> list[Delivery]:
        """Claim up to ``limit`` due deliveries of ``channels`` (one transaction)."""
        names = list(channels)
        if not names or limit <= 0:
            return []
        self.begin()
        try:
            stamp = self._stamp(now)
            due = self._all("due", stamp, self._list(names), limit * CANDIDATES)
            heads = (
                {
                    (rid, ch): int(first)
                    for rid, ch, first in self._all("heads", self._list({r for _, r, _ in due}))
                }
                if due
                else {}
            )
            # Only the oldest open delivery of a referral on a channel may go: the rest
            # wait their turn (per-referral order). Locked-but-unclaimed candidates are
            # released at commit.
            ids = [int(i) for i, rid, ch in due if heads.get((rid, ch)) == int(i)][:limit]
            if not ids:
                self.end()
                return []
            self._exec("claim", stamp, worker, stamp, self._list(ids))
            rows = self._all("get", self._list(ids))
            self.commit()
        except BaseException:
            self.end()
            raise
        return [self._delivery(r) for r in rows]

    def reclaim(self, stalled_before: datetime, worker: str) -> int:
        """Other workers' in-flight rows claimed before ``stalled_before`` back to pending."""
        self.begin()
        try:
            n = self._exec("reclaim", self._stamp(stalled_before), worker)
            self.commit()
        except BaseException:
            self.end()
            raise
        return n

    def save_render(
        self, delivery_id: int, payload: bytes, content_type: str, meta: dict[str, str]
    ) -> None:
        self.begin()
        try:
            self._exec(
                "render", payload, content_type, json.dumps(meta, sort_keys=True), delivery_id
            )
            self.commit()
        except BaseException:
            self.end()
            raise

    def finish(
        self,
        delivery_id: int,
        status: str,
        now: datetime,
        *,
        error: str | None = None,
        receipt: dict[str, Any] | None = None,
    ) -> bool:
        """Record a final outcome inside the caller's transaction. False when the row is
        no longer ours (reclaimed by another worker after our lease ran out)."""
        stamp = self._stamp(now)
        n = self._exec(
            "finish",
            status,
            stamp,
            stamp,
            error,
            json.dumps(receipt, sort_keys=True) if receipt is not None else None,
            delivery_id,
        )
        return n > 0

    def later(self, delivery_id: int, now: datetime, when: datetime, error: str) -> bool:
        """Back to pending until ``when`` (inside the caller's transaction)."""
        return self._exec("later", self._stamp(now), self._stamp(when), error, delivery_id) > 0

    # -- operators -----------------------------------------------------------------------

    def get(self, ids: Iterable[int]) -> list[Delivery]:
        try:
            return [self._delivery(r) for r in self._all("get", self._list(ids))]
        finally:
            self.end()

    def search(
        self,
        *,
        status: str | None = None,
        channel: str | None = None,
        referral_id: str | None = None,
        limit: int = 100,
    ) -> list[Delivery]:
        try:
            rows = self._all(
                "list", status, status, channel, channel, referral_id, referral_id, limit
            )
            return [self._delivery(r) for r in rows]
        finally:
            self.end()

    def retry(self, ids: Sequence[int] | None, now: datetime) -> list[int]:
        """Dead (or cancelled, or waiting) deliveries due again now with a fresh retry
        budget; ``None`` retries every dead one. Returns the ids that changed."""
        self.begin()
        try:
            targets = list(ids) if ids is not None else [int(i) for (i,) in self._all("dead_ids")]
            if not targets:
                self.end()
                return []
            before = {
                d.id: d.status for d in map(self._delivery, self._all("get", self._list(targets)))
            }
            stamp = self._stamp(now)
            self._exec("retry", stamp, stamp, stamp, self._list(targets))
            self.commit()
        except BaseException:
            self.end()
            raise
        return [i for i in targets if before.get(i) in ("dead", "pending", "cancelled")]

    def cancel_pending(
        self, cur: Any, referral_ids: Sequence[str], kind: str, reason: str, now: datetime
    ) -> None:
        """Cancel the pending deliveries of ``kind`` for these referrals (caller's transaction)."""
        if referral_ids:
            stamp = self._stamp(now)
            cur.execute(
                self.sql["cancel_kind"], (stamp, stamp, reason, kind, self._list(referral_ids))
            )

    def cancel(self, delivery_id: int, now: datetime) -> bool:
        self.begin()
        try:
            stamp = self._stamp(now)
            n = self._exec("cancel", stamp, stamp, delivery_id)
            self.commit()
        except BaseException:
            self.end()
            raise
        return n > 0

    def counts(self) -> dict[tuple[str, str], int]:
        """``{(channel, status): n}`` for pending, in-flight and dead rows."""
        try:
            return {(c, s): int(n) for c, s, n in self._all("counts")}
        finally:
            self.end()

    # -- what a renderer needs -----------------------------------------------------------

    def source_event(self, event_id: str) -> SourceEvent | None:
        rows = self._all("event", event_id)
        if not rows:
            return None
        eid, rid, seq, etype, occurred, fields, before, after, mid = rows[0]
        return SourceEvent(
            eid,
            rid,
            int(seq),
            etype,
            self._time(occurred),
            json.loads(fields),
            before,
            after,
            int(mid) if mid is not None else None,
        )

    def order_message_id(self, referral_id: str) -> int | None:
        rows = self._all("created_message", referral_id)
        return int(rows[0][0]) if rows else None

    def raw_messages(self, ids: Iterable[int]) -> dict[int, tuple[bytes, str | None, str]]:
        """``{id: (raw, charset, message type)}`` of stored messages."""
        wanted = [i for i in ids if i is not None]
        if not wanted:
            return {}
        return {
            int(i): (bytes(raw), charset, mtype or "")
            for i, raw, charset, mtype in self._all("raw", self._list(wanted))
        }

    # -- helpers -------------------------------------------------------------------------

    def _delivery(self, row: tuple[Any, ...]) -> Delivery:
        v = dict(zip(COLUMNS, row, strict=True))
        return Delivery(
            id=int(v["id"]),
            key=v["key"],
            referral_id=v["referral_id"],
            event_id=v["event_id"],
            route_id=v["route_id"],
            kind=v["kind"],
            channel=v["channel"],
            format=v["format"],
            endpoint=v["endpoint"] or "",
            recipient_id=v["recipient_id"] or "",
            receiver_application=v["receiver_application"] or "",
            receiver_facility=v["receiver_facility"] or "",
            status=v["status"],
            attempts=int(v["attempts"]),
            created_at=self._time(v["created_at"]),
            updated_at=self._time(v["updated_at"]),
            next_attempt_at=self._time(v["next_attempt_at"]),
            age_from=self._time(v["age_from"]),
            claimed_at=self._maybe_time(v["claimed_at"]),
            claimed_by=v["claimed_by"],
            finished_at=self._maybe_time(v["finished_at"]),
            payload=bytes(v["payload"]) if v["payload"] is not None else None,
            content_type=v["content_type"],
            meta=json.loads(v["meta"]) if v["meta"] else {},
            last_error=v["last_error"],
            receipt=json.loads(v["receipt"]) if v["receipt"] else None,
        )
