"""Policy timers in the store: pending ones by referral, arming, clearing, claiming.

Theory of operation
-------------------
A timer row is written in the transaction of the event that arms it and marked
``cleared`` in the transaction of the event that makes it moot, so the timers always
agree with the event log. Ids are deterministic (:func:`engine.policy.timers.timer_id`):
arming one that exists (a replay, a re-armed step) does nothing, so a timer that fired
stays fired.

The scheduler claims due rows in the transaction that also writes what they do (events,
worklist items, deliveries) and marks them ``fired``: a crash before the commit leaves
them pending for the next claim, a crash after leaves them fired, so a restart loses
none and fires none twice. On PostgreSQL the claim is ``FOR UPDATE SKIP LOCKED`` (two
engines never take the same row) and only one scheduler runs at a time (an advisory
lock, :data:`SCHEDULER_LOCK`); on SQLite the database's write lock does both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from engine.policy.timers import Timer
from engine.store.driver import DriverQueries

#: pg_try_advisory_xact_lock(class, key) held by the one scheduler ticking: "ref2" and
#: the schema's name, as the event log's writer lock does with "ref1".
SCHEDULER_LOCK = f"{0x72656632}, hashtext(current_schema())"

_COLUMNS = "id, referral_id, rule, kind, step, entry, entered_at, due_at"


class TimerQueries(DriverQueries):
    """The timer statements on one DBAPI connection (inside the caller's transaction)."""

    def __init__(self, dbapi_connection: Any, dialect: str) -> None:
        super().__init__(dbapi_connection, dialect)
        m = self.mark
        skip = "" if self.sqlite else " FOR UPDATE SKIP LOCKED"
        self.sql = {
            "pending": f"SELECT {_COLUMNS} FROM referral_timers "
            f"WHERE status = 'pending' AND {self.among('referral_id')}",
            "insert": f"INSERT INTO referral_timers ({_COLUMNS}, status, created_at, updated_at)"
            f" VALUES ({', '.join([m] * 8)}, 'pending', {m}, {m}) ON CONFLICT (id) DO NOTHING",
            "clear": f"UPDATE referral_timers SET status = 'cleared', updated_at = {m} "
            f"WHERE status = 'pending' AND {self.among('id')}",
            "fired": f"UPDATE referral_timers SET status = 'fired', updated_at = {m} "
            f"WHERE status = 'pending' AND {self.among('id')}",
            "due": f"SELECT {_COLUMNS} FROM referral_timers WHERE status = 'pending' "
            f"AND due_at <= {m} ORDER BY due_at, id LIMIT {m}{skip}",
            "defer": f"UPDATE referral_timers SET due_at = {m}, updated_at = {m} "
            f"WHERE id = {m} AND status = 'pending'",
            "count_due": "SELECT COUNT(*) FROM referral_timers WHERE status = 'pending' "
            f"AND due_at <= {m}",
            "next_due": "SELECT MIN(due_at) FROM referral_timers WHERE status = 'pending'",
            "scheduler_lock": f"SELECT pg_try_advisory_xact_lock({SCHEDULER_LOCK})",
        }

    def pending(self, referral_ids: Iterable[str]) -> list[Timer]:
        ids = sorted(set(referral_ids))
        if not ids:
            return []
        return [self._timer(r) for r in self._all("pending", self._list(ids))]

    def insert(self, cur: Any, timers: Sequence[Timer], now: datetime) -> None:
        if timers:
            stamp = self._stamp(now)
            cur.executemany(self.sql["insert"], [(*self._params(t), stamp, stamp) for t in timers])

    def clear(self, cur: Any, ids: Sequence[str], now: datetime) -> None:
        if ids:
            cur.execute(self.sql["clear"], (self._stamp(now), self._list(ids)))

    def fired(self, cur: Any, ids: Sequence[str], now: datetime) -> None:
        if ids:
            cur.execute(self.sql["fired"], (self._stamp(now), self._list(ids)))

    def defer(self, cur: Any, later: Sequence[tuple[str, datetime]], now: datetime) -> None:
        """Keep these timers pending, due again at the given time (quiet hours)."""
        if later:
            stamp = self._stamp(now)
            cur.executemany(
                self.sql["defer"], [(self._stamp(when), stamp, tid) for tid, when in later]
            )

    def due(self, now: datetime, limit: int) -> list[Timer]:
        """Pending timers due by ``now``, earliest first, locked for this transaction on
        PostgreSQL (rows another engine holds are skipped, not waited for)."""
        return [self._timer(r) for r in self._all("due", self._stamp(now), limit)]

    def count_due(self, now: datetime) -> int:
        rows = self._all("count_due", self._stamp(now))
        return int(rows[0][0]) if rows else 0

    def next_due(self) -> datetime | None:
        rows = self._all("next_due")
        return self._maybe_time(rows[0][0]) if rows else None

    def scheduler_turn(self) -> bool:
        """True when this transaction is the one scheduler (always on SQLite)."""
        if self.sqlite:
            return True
        rows = self._all("scheduler_lock")
        return bool(rows and rows[0][0])

    def _params(self, t: Timer) -> tuple[Any, ...]:
        return (
            t.id,
            t.referral_id,
            t.rule,
            t.kind,
            t.step,
            t.entry,
            self._stamp(t.entered_at),
            self._stamp(t.due_at),
        )

    def _timer(self, row: tuple[Any, ...]) -> Timer:
        tid, rid, rule, kind, step, entry, entered_at, due_at = row
        return Timer(
            id=tid,
            referral_id=rid,
            rule=rule,
            kind=kind,
            due_at=self._time(due_at),
            step=int(step),
            entry=int(entry),
            entered_at=self._time(entered_at),
        )
