"""The exception worklist in the store: items raised by the engine's writers.

Items are raised inside the transaction of whatever found the exception (a missed
window, a dead-lettered delivery, an unmatched message) with a deterministic ``key``,
so a replay raises nothing twice (``ON CONFLICT (key) DO NOTHING``). An item raised
with the referral's ``state`` resolves itself, by ``refloop``, once the referral leaves
that state: a stalled referral that gets booked is no longer an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.store.driver import DriverQueries

#: Who the engine's own actions are recorded as.
ENGINE_ACTOR = "refloop"
OPEN_STATUSES = ("open", "acknowledged", "snoozed")


@dataclass(frozen=True, slots=True)
class NewItem:
    key: str  # deterministic: the cause's id (a timer effect, an event, a message)
    reason: str  # a code: not_scheduled_in_14d, delivery_dead_lettered, unmatched_message …
    referral_id: str | None = None
    message_id: int | None = None
    owner: str = "coordinator"
    due_at: datetime | None = None
    state: str | None = None  # resolve once the referral leaves this state
    detail: str = ""  # safe text for the coordinator: never patient data


@dataclass(frozen=True, slots=True)
class Moved:
    """A referral changed state: its items raised for another state are resolved."""

    referral_id: str
    state: str


class WorklistQueries(DriverQueries):
    def __init__(self, dbapi_connection: Any, dialect: str) -> None:
        super().__init__(dbapi_connection, dialect)
        m = self.mark
        open_ = ", ".join(f"'{s}'" for s in OPEN_STATUSES)
        self.sql = {
            "insert": "INSERT INTO worklist_items (key, referral_id, message_id, reason, detail, "
            "owner, status, state, due_at, created_at, updated_at) "
            f"VALUES ({m}, {m}, {m}, {m}, {m}, {m}, 'open', {m}, {m}, {m}, {m}) "
            "ON CONFLICT (key) DO NOTHING",
            "resolve_moved": f"UPDATE worklist_items SET status = 'resolved', resolved_at = {m}, "
            f"resolved_by = '{ENGINE_ACTOR}', updated_at = {m} WHERE referral_id = {m} "
            f"AND state IS NOT NULL AND state <> {m} AND status IN ({open_})",
        }

    def insert(self, cur: Any, items: Sequence[NewItem], now: datetime) -> None:
        if not items:
            return
        stamp = self._stamp(now)
        cur.executemany(
            self.sql["insert"],
            [
                (
                    i.key,
                    i.referral_id,
                    i.message_id,
                    i.reason,
                    i.detail or None,
                    i.owner,
                    i.state,
                    None if i.due_at is None else self._stamp(i.due_at),
                    stamp,
                    stamp,
                )
                for i in items
            ],
        )

    def resolve_moved(self, cur: Any, moved: Sequence[Moved], now: datetime) -> None:
        if moved:
            stamp = self._stamp(now)
            cur.executemany(
                self.sql["resolve_moved"], [(stamp, stamp, m.referral_id, m.state) for m in moved]
            )
