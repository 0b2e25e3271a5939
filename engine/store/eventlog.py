"""The normaliser's side of the store: read what it needs for a batch, write the batch.

Theory of operation
-------------------
One normaliser works at a time, and everything one batch decides — events appended,
projections updated, keys indexed, messages marked or parked or re-queued — commits in
ONE transaction. :meth:`EventLog.begin` starts that transaction holding the writer's
turn: ``BEGIN IMMEDIATE`` on SQLite (the database-wide write lock, taken up front so a
read-then-write never fails half-way), a transaction-scoped advisory lock on PostgreSQL
(so two replicas, or a replica and ``refloop messages replay``, never interleave and
per-referral order holds). Nothing is read under that lock that the batch does not need:
a few small lookups, one query each for the whole batch.

Events go in with ``ON CONFLICT (id) DO NOTHING``: their ids are derived from the
message and the event, so normalising a message again appends nothing twice.

Like :mod:`engine.store.ingest`, this talks to the driver directly with constant SQL;
a variable-length list is one parameter (``= ANY(%s)`` on PostgreSQL, ``json_each(?)``
on SQLite), so every statement text is fixed and the driver's statement cache works.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.pool import PoolProxiedConnection

from engine.domain.correlation import Key, KeyKind
from engine.domain.projection import Referral
from engine.domain.referral import TERMINAL, Event, State
from engine.policy.timers import Timer
from engine.store.driver import DriverQueries
from engine.store.outbox import NewDelivery, Outbox
from engine.store.timers import TimerQueries
from engine.store.worklist import Moved, NewItem, WorklistQueries

#: pg_advisory_xact_lock(class, key) held while a normaliser batch is written: the class
#: is "ref1"; the key is the schema's name, hashed, so replicas sharing one schema take
#: turns while deployments in other schemas of the same database never wait on them.
LOCK_CLASS = 0x72656631
LOCK_ARGS = f"{LOCK_CLASS}, hashtext(current_schema())"

REFERRAL_COLUMNS = (
    "id",
    "state",
    "placer_order_number",
    "placer_assigner",
    "referral_number",
    "specialty",
    "priority",
    "patient_key",
    "created_at",
    "updated_at",
    "last_sequence",
    "needs_review",
    "data",
)
EVENT_COLUMNS = (
    "id",
    "referral_id",
    "sequence",
    "type",
    "occurred_at",
    "recorded_at",
    "message_id",
    "mapping_id",
    "mapping_digest",
    "rule_id",
    "correlation_method",
    "confidence",
    "state_before",
    "state_after",
    "anomaly",
    "fields",
)
_MESSAGE_COLUMNS = "id, received_at, listener, charset, raw, status, message_type"


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    received_at: datetime
    listener: str
    charset: str | None
    raw: bytes
    status: str
    message_type: str | None


@dataclass(frozen=True, slots=True)
class EventRow:
    id: str
    referral_id: str
    sequence: int
    type: Event
    occurred_at: datetime
    recorded_at: datetime
    message_id: int | None
    mapping_id: str
    mapping_digest: str
    rule_id: str
    correlation_method: str
    confidence: float
    state_before: State | None
    state_after: State | None
    anomaly: str | None
    fields: str  # canonical JSON


@dataclass(frozen=True, slots=True)
class MessageUpdate:
    message_id: int
    status: str
    diagnostics: tuple[dict[str, str], ...] = ()
    mapping_id: str = ""
    rule_id: str = ""
    parked: bool = False  # it waited for a referral: parked_at is set if not yet
    keys: tuple[Key, ...] = ()  # what a parked message waits for


@dataclass(frozen=True, slots=True)
class Changes:
    """Everything one batch writes, in one transaction."""

    messages: Sequence[MessageUpdate] = ()
    referrals: Sequence[Referral] = ()
    events: Sequence[EventRow] = ()
    keys: Sequence[tuple[Key, str]] = ()  # (key, referral id)
    unpark: Sequence[int] = ()  # parked messages (outside the batch) back to received
    deliveries: Sequence[NewDelivery] = ()  # the outbox rows these events cause
    # Referral policy (engine.services.policy_runtime): timers these events arm, clear
    # and (the scheduler) fire, the exceptions they raise, the items they make moot.
    timers: Sequence[Timer] = ()
    cleared_timers: Sequence[str] = ()
    fired_timers: Sequence[str] = ()
    worklist: Sequence[NewItem] = ()
    moved: Sequence[Moved] = ()
    # (referral id, why): cancel the referral's outreach still waiting in the outbox.
    stop_outreach: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A row of the log, for rebuilds and timelines."""

    id: str
    referral_id: str
    sequence: int
    type: Event
    occurred_at: datetime
    recorded_at: datetime
    confidence: float
    fields: dict[str, Any]
    rule_id: str


class Busy(Exception):
    """Another normaliser holds the turn (PostgreSQL only); try again later."""


class EventLog(DriverQueries):
    """The normaliser's queries on one DBAPI connection (psycopg 3 or sqlite3)."""

    def __init__(self, dbapi_connection: Any, dialect: str) -> None:
        super().__init__(dbapi_connection, dialect)
        self.outbox = Outbox(dbapi_connection, dialect)
        self.timers = TimerQueries(dbapi_connection, dialect)
        self.worklist = WorklistQueries(dbapi_connection, dialect)
        m = self.mark
        among = self.among

        refcols = ", ".join(REFERRAL_COLUMNS)
        terminal = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL))
        self.sql = {
            "received": f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE status = 'received' "
            f"ORDER BY id LIMIT {m}",
            "messages": f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {among('id')} ORDER BY id",
            "statuses": f"SELECT id, status FROM messages WHERE {among('id')}",
            "keys": "SELECT kind, value, assigner, referral_id FROM referral_keys "
            f"WHERE {among('value')}",
            "events": f"SELECT id, referral_id FROM referral_events WHERE {among('id')}",
            "referrals": f"SELECT {refcols} FROM referrals WHERE {among('id')}",
            "open": f"SELECT {refcols} FROM referrals WHERE {among('patient_key')} "
            f"AND state NOT IN ({terminal})",
            "parked": f"SELECT message_id, kind, value, assigner FROM parked_keys "
            f"WHERE {among('value')}",
            "insert_event": f"INSERT INTO referral_events ({', '.join(EVENT_COLUMNS)}) "
            f"VALUES ({', '.join([m] * len(EVENT_COLUMNS))}) ON CONFLICT (id) DO NOTHING",
            "upsert_referral": f"INSERT INTO referrals ({refcols}) "
            f"VALUES ({', '.join([m] * len(REFERRAL_COLUMNS))}) ON CONFLICT (id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in REFERRAL_COLUMNS if c != "id"),
            "insert_key": "INSERT INTO referral_keys (kind, value, assigner, referral_id) "
            f"VALUES ({m}, {m}, {m}, {m}) ON CONFLICT DO NOTHING",
            "mark": f"UPDATE messages SET status = {m}, normalised_at = {m}, diagnostics = {m}, "
            f"mapping_id = {m}, rule_id = {m}, attempts = attempts + 1 WHERE id = {m}",
            "mark_parked": f"UPDATE messages SET status = {m}, normalised_at = {m}, "
            f"diagnostics = {m}, mapping_id = {m}, rule_id = {m}, attempts = attempts + 1, "
            f"parked_at = COALESCE(parked_at, {m}) WHERE id = {m}",
            "forget_parked": f"DELETE FROM parked_keys WHERE {among('message_id')}",
            "park_key": "INSERT INTO parked_keys (message_id, kind, value, assigner) "
            f"VALUES ({m}, {m}, {m}, {m}) ON CONFLICT DO NOTHING",
            # An unmatched message (parked past its TTL) is an exception on the
            # worklist, but if its referral turns up after all, it goes through.
            "unpark": "UPDATE messages SET status = 'received' "
            f"WHERE {among('id')} AND status IN ('parked', 'unmatched')",
            "expired": "SELECT id FROM messages WHERE status = 'parked' "
            f"AND parked_at < {m} ORDER BY id",
            "expire": f"UPDATE messages SET status = 'unmatched', normalised_at = {m} "
            f"WHERE {among('id')} AND status = 'parked'",
            "requeue_parked": "UPDATE messages SET status = 'received' WHERE status = 'parked'",
            "requeue": f"UPDATE messages SET status = 'received' WHERE {among('id')}",
            "counts": "SELECT status, COUNT(*) FROM messages "
            "WHERE status IN ('received', 'parked', 'unmatched') GROUP BY status",
            "states": "SELECT state, COUNT(*) FROM referrals GROUP BY state",
            "all_events": "SELECT id, referral_id, sequence, type, occurred_at, recorded_at, "
            "confidence, fields, rule_id FROM referral_events ORDER BY referral_id, sequence",
            "all_referrals": f"SELECT {refcols} FROM referrals",
            "clear_keys": "DELETE FROM referral_keys",
        }
        self.sql["lock"] = (
            "BEGIN IMMEDIATE" if self.sqlite else f"SELECT pg_try_advisory_xact_lock({LOCK_ARGS})"
        )
        self.sql["lock_wait"] = (
            "BEGIN IMMEDIATE" if self.sqlite else f"SELECT pg_advisory_xact_lock({LOCK_ARGS})"
        )

    # -- transactions ------------------------------------------------------------------

    def begin(self, *, wait: bool = False) -> None:
        """Start the batch's transaction holding the normaliser's turn; raises :class:`Busy`
        when another normaliser has it and ``wait`` is false (PostgreSQL)."""
        self.end()
        cur = self.conn.cursor()
        try:
            cur.execute(self.sql["lock_wait" if wait else "lock"])
            if not self.sqlite and not cur.fetchone()[0] and not wait:
                self.conn.rollback()
                raise Busy
        finally:
            cur.close()

    def commit(self) -> None:
        self.conn.commit()

    def end(self) -> None:
        """End whatever read transaction the driver opened (psycopg opens one per read)."""
        self.conn.rollback()

    # -- reads -------------------------------------------------------------------------

    def received(self, limit: int) -> list[StoredMessage]:
        """The oldest messages waiting for normalisation, in id order."""
        return [self._message(r) for r in self._all("received", limit)]

    def messages(self, ids: Iterable[int]) -> list[StoredMessage]:
        return [self._message(r) for r in self._all("messages", self._list(ids))]

    def statuses(self, ids: Iterable[int]) -> dict[int, str]:
        return {int(i): s for i, s in self._all("statuses", self._list(ids))}

    def keys(self, values: Iterable[str]) -> list[tuple[Key, str]]:
        """Indexed keys with any of these values, with their referral."""
        return [
            (Key(KeyKind(kind), value, assigner), referral_id)
            for kind, value, assigner, referral_id in self._all("keys", self._list(values))
        ]

    def known_events(self, ids: Iterable[str]) -> dict[str, str]:
        """Which of these event ids the log already has → their referral."""
        return {i: r for i, r in self._all("events", self._list(ids))}

    def referrals(self, ids: Iterable[str]) -> list[Referral]:
        return [self._referral(r) for r in self._all("referrals", self._list(ids))]

    def open_referrals(self, patient_keys: Iterable[str]) -> list[Referral]:
        """Referrals not yet closed, declined or cancelled, for these patients."""
        return [self._referral(r) for r in self._all("open", self._list(patient_keys))]

    def parked(self, values: Iterable[str]) -> list[tuple[int, Key]]:
        """Parked messages waiting for a key with one of these values."""
        return [
            (int(mid), Key(KeyKind(kind), value, assigner))
            for mid, kind, value, assigner in self._all("parked", self._list(values))
        ]

    def counts(self) -> dict[str, int]:
        """Messages received (the backlog), parked and unmatched."""
        return {s: int(n) for s, n in self._all("counts")}

    def states(self) -> dict[str, int]:
        return {s: int(n) for s, n in self._all("states")}

    def all_events(self) -> Iterator[StoredEvent]:
        """The whole log, by referral and sequence (streamed)."""
        cur = self.conn.cursor()
        try:
            cur.execute(self.sql["all_events"])
            while rows := cur.fetchmany(1000):
                for eid, rid, seq, etype, occurred, recorded, conf, fields, rule in rows:
                    yield StoredEvent(
                        eid,
                        rid,
                        int(seq),
                        Event(etype),
                        self._time(occurred),
                        self._time(recorded),
                        float(conf),
                        json.loads(fields),
                        rule or "",
                    )
        finally:
            cur.close()

    def all_referrals(self) -> list[Referral]:
        return [self._referral(r) for r in self._all("all_referrals")]

    # -- writes ------------------------------------------------------------------------

    def write(self, changes: Changes, now: datetime) -> None:
        """Write one batch inside the transaction :meth:`begin` opened (no commit)."""
        cur = self.conn.cursor()
        try:
            if changes.referrals:  # before their events and keys (foreign keys)
                cur.executemany(
                    self.sql["upsert_referral"],
                    [self._referral_params(r) for r in changes.referrals],
                )
            if changes.events:
                cur.executemany(
                    self.sql["insert_event"], [self._event_params(e) for e in changes.events]
                )
            if changes.keys:
                cur.executemany(
                    self.sql["insert_key"],
                    [(k.kind.value, k.value, k.assigner, rid) for k, rid in changes.keys],
                )
            # Before new deliveries: a nudge planned in this transaction stays.
            reasons: dict[str, list[str]] = {}
            for rid, why in dict.fromkeys(changes.stop_outreach):
                reasons.setdefault(why, []).append(rid)
            for why, rids in reasons.items():
                self.outbox.cancel_pending(cur, rids, "outreach", why, now)
            if changes.deliveries:
                self.outbox.insert(cur, changes.deliveries, now)
            self.timers.clear(cur, changes.cleared_timers, now)
            self.timers.fired(cur, changes.fired_timers, now)
            self.timers.insert(cur, changes.timers, now)
            self.worklist.resolve_moved(cur, changes.moved, now)
            self.worklist.insert(cur, changes.worklist, now)
            touched = [u.message_id for u in changes.messages] + list(changes.unpark)
            if touched:
                cur.execute(self.sql["forget_parked"], (self._list(touched),))
            if changes.unpark:
                cur.execute(self.sql["unpark"], (self._list(changes.unpark),))
            stamp = self._stamp(now)
            plain = [u for u in changes.messages if not u.parked]
            parked = [u for u in changes.messages if u.parked]
            if plain:
                cur.executemany(self.sql["mark"], [self._mark(u, stamp) for u in plain])
            if parked:
                cur.executemany(
                    self.sql["mark_parked"],
                    [(*self._mark(u, stamp)[:-1], stamp, u.message_id) for u in parked],
                )
                waits = [
                    (u.message_id, k.kind.value, k.value, k.assigner)
                    for u in parked
                    if u.status == "parked"
                    for k in u.keys
                ]
                if waits:
                    cur.executemany(self.sql["park_key"], waits)
        finally:
            cur.close()

    def expire_parked(self, older_than: datetime, now: datetime) -> list[int]:
        """Parked messages past their time become ``unmatched`` (in the open transaction)."""
        ids = [int(i) for (i,) in self._all("expired", self._stamp(older_than))]
        if ids:
            cur = self.conn.cursor()
            try:
                # Its keys stay: they say what it waited for, and release it if the
                # referral appears later.
                cur.execute(self.sql["expire"], (self._stamp(now), self._list(ids)))
            finally:
                cur.close()
        return ids

    def requeue_parked(self) -> int:
        """Every parked message back to ``received`` (the sweep: heuristics may match now)."""
        cur = self.conn.cursor()
        try:
            cur.execute(self.sql["requeue_parked"])
            return int(cur.rowcount)
        finally:
            cur.close()

    def requeue(self, ids: Sequence[int]) -> None:
        cur = self.conn.cursor()
        try:
            cur.execute(self.sql["requeue"], (self._list(ids),))
        finally:
            cur.close()

    def replace_projections(
        self, referrals: Sequence[Referral], keys: Sequence[tuple[Key, str]]
    ) -> None:
        """Rewrite projections and the whole key index (``referrals rebuild``)."""
        cur = self.conn.cursor()
        try:
            if referrals:
                cur.executemany(
                    self.sql["upsert_referral"], [self._referral_params(r) for r in referrals]
                )
            cur.execute(self.sql["clear_keys"])
            if keys:
                cur.executemany(
                    self.sql["insert_key"],
                    [(k.kind.value, k.value, k.assigner, rid) for k, rid in keys],
                )
        finally:
            cur.close()

    # -- helpers -----------------------------------------------------------------------

    def _message(self, row: tuple[Any, ...]) -> StoredMessage:
        mid, received_at, listener, charset, raw, status, mtype = row
        return StoredMessage(
            int(mid), self._time(received_at), listener, charset, bytes(raw), status, mtype
        )

    def _referral(self, row: tuple[Any, ...]) -> Referral:
        values = dict(zip(REFERRAL_COLUMNS, row, strict=True))
        return Referral(
            id=values["id"],
            state=State(values["state"]),
            sequence=int(values["last_sequence"]),
            created_at=self._time(values["created_at"]),
            updated_at=self._time(values["updated_at"]),
            needs_review=bool(values["needs_review"]),
            data=json.loads(values["data"]),
        )

    def _referral_params(self, r: Referral) -> tuple[Any, ...]:
        placer = r.placer_order
        return (
            r.id,
            r.state.value,
            placer[0] if placer else None,
            placer[1] if placer else None,
            r.referral_number,
            r.specialty,
            r.priority,
            r.patient_key,
            self._stamp(r.created_at),
            self._stamp(r.updated_at),
            r.sequence,
            r.needs_review,
            json.dumps(r.data, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
        )

    def _event_params(self, e: EventRow) -> tuple[Any, ...]:
        return (
            e.id,
            e.referral_id,
            e.sequence,
            e.type.value,
            self._stamp(e.occurred_at),
            self._stamp(e.recorded_at),
            e.message_id,
            e.mapping_id or None,
            e.mapping_digest or None,
            e.rule_id or None,
            e.correlation_method,
            e.confidence,
            e.state_before.value if e.state_before else None,
            e.state_after.value if e.state_after else None,
            e.anomaly,
            e.fields,
        )

    def _mark(self, u: MessageUpdate, stamp: Any) -> tuple[Any, ...]:
        diagnostics = json.dumps(list(u.diagnostics)) if u.diagnostics else None
        return (
            u.status,
            stamp,
            diagnostics,
            u.mapping_id or None,
            u.rule_id or None,
            u.message_id,
        )


class LogConnection:
    """One raw connection and its :class:`EventLog`, opened on first use, for a worker
    thread (the normaliser, the dispatcher): dropped after an error, so the next use
    starts on a fresh connection."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._raw: PoolProxiedConnection | None = None
        self._log: EventLog | None = None

    @property
    def dialect(self) -> str:
        return str(self._engine.dialect.name)

    @property
    def eventlog(self) -> EventLog:
        if self._log is None:
            self._raw = self._engine.raw_connection()
            self._log = EventLog(self._raw.driver_connection, self._engine.dialect.name)
        return self._log

    def drop(self) -> None:
        """Forget the connection after an error (the next use opens a fresh one)."""
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.invalidate()
        self._raw = None
        self._log = None

    def close(self) -> None:
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.rollback()
                self._raw.close()
        self._raw = None
        self._log = None
