"""The exception worklist in the store: items raised by the engine's writers, read and
worked by people.

Theory of operation
-------------------
Items are raised inside the transaction of whatever found the exception (a missed
window, a dead-lettered delivery, an unmatched message) with a deterministic ``key``,
so a replay raises nothing twice (``ON CONFLICT (key) DO NOTHING``). An item raised
with the referral's ``state`` resolves itself, by ``refloop``, once the referral leaves
that state: a stalled referral that gets booked is no longer an exception.

A coordinator works an item through four actions: **acknowledge** (I have seen it),
**assign** (it is X's), **snooze** (not before then) and **resolve** (done). Which
action an item allows is decided by the pure :func:`decide`, from the item as read and
the caller's ``now``; :meth:`WorklistQueries.apply` then writes the item's new status
and a ``worklist_actions`` row (who, when, the note) in the caller's transaction. The
update is conditional on the status read, so an item changed meanwhile (the engine
resolved it, another coordinator acted) refuses the action instead of overwriting.

A snoozed item keeps its status: it needs a human again once ``snoozed_until`` has
passed, which every read works out against the ``now`` it is given (the store has no
clock), so nothing has to wake it. "Open" — what needs a human now, and what the
``refloop_worklist_open`` gauge counts — is ``open`` and ``acknowledged`` items plus
snoozed ones whose time has come.

An action on an item with a referral is also an event on the referral's timeline
(:data:`EVENT_TYPES`, :func:`event_fields`, :func:`event_id`); the caller appends it in
the same transaction (``refloop worklist``, :mod:`engine.edges.cli_worklist`). Items
without a referral (an unmatched message, an SMS from an unknown number) keep their
history in ``worklist_actions`` only.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from engine.domain.referral import Event
from engine.store.driver import DriverQueries

#: Who the engine's own actions are recorded as.
ENGINE_ACTOR = "refloop"
OPEN_STATUSES = ("open", "acknowledged", "snoozed")
STATUSES = ("open", "acknowledged", "snoozed", "resolved")
#: What ``search`` can be asked for: a status, "open" (needs a human now) or "all".
VIEWS = ("open", "acknowledged", "snoozed", "resolved", "all")
#: The action a person takes → the event it is on the referral's timeline.
EVENT_TYPES: dict[str, Event] = {
    "acknowledged": Event.WORKLIST_ACKNOWLEDGED,
    "assigned": Event.WORKLIST_ASSIGNED,
    "snoozed": Event.WORKLIST_SNOOZED,
    "resolved": Event.WORKLIST_RESOLVED,
}
ACTIONS = tuple(EVENT_TYPES)
#: worklist_items.assignee, worklist_actions.actor (String(64)).
NAME_MAX = 64
NOTE_MAX = 2000
_NAMESPACE = uuid.UUID("8e4c1b7a-2f6d-4a09-b3e5-71d0c9a4f2e6")
_COLUMNS = (
    "id",
    "key",
    "referral_id",
    "message_id",
    "reason",
    "detail",
    "owner",
    "assignee",
    "status",
    "state",
    "due_at",
    "snoozed_until",
    "created_at",
    "updated_at",
    "resolved_at",
    "resolved_by",
)


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


class WorklistError(Exception):
    """An action the worklist refuses; the message says what to do instead."""


class UnknownItem(WorklistError, LookupError):
    def __init__(self, item_id: int) -> None:
        super().__init__(f"no worklist item {item_id} (see `refloop worklist --status all`)")
        self.item_id = item_id


class RefusedAction(WorklistError, ValueError):
    """The item's status does not allow the action, or its arguments are impossible."""


@dataclass(frozen=True, slots=True)
class Item:
    id: int
    key: str
    referral_id: str | None
    message_id: int | None
    reason: str
    detail: str
    owner: str
    assignee: str | None
    status: str
    state: str | None
    due_at: datetime | None
    snoozed_until: datetime | None
    created_at: datetime
    updated_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None

    def awake(self, now: datetime) -> bool:
        """Snoozed, and the snooze is over."""
        return (
            self.status == "snoozed"
            and self.snoozed_until is not None
            and self.snoozed_until <= now
        )

    def needs_attention(self, now: datetime) -> bool:
        return self.status in ("open", "acknowledged") or self.awake(now)

    def overdue(self, now: datetime) -> bool:
        return self.due_at is not None and self.due_at < now and self.status != "resolved"

    def summary(self, now: datetime) -> dict[str, Any]:
        """JSON-able: ids, codes and the safe ``detail``, never patient data."""
        return {
            "id": self.id,
            "reason": self.reason,
            "status": self.status,
            "needs_attention": self.needs_attention(now),
            "referral_id": self.referral_id,
            "message_id": self.message_id,
            "owner": self.owner,
            "assignee": self.assignee,
            "detail": self.detail or None,
            "due_at": _iso(self.due_at),
            "overdue": self.overdue(now),
            "snoozed_until": _iso(self.snoozed_until),
            "state": self.state,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "resolved_at": _iso(self.resolved_at),
            "resolved_by": self.resolved_by,
        }


@dataclass(frozen=True, slots=True)
class Action:
    """One row of an item's history."""

    id: int
    item_id: int
    action: str  # acknowledged | assigned | snoozed | resolved
    actor: str
    at: datetime
    note: str | None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "actor": self.actor,
            "at": self.at.isoformat(),
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class Step:
    """What one action does to an item (:func:`decide`'s answer, :meth:`apply`'s input)."""

    action: str
    actor: str
    at: datetime
    status: str
    assignee: str | None
    snoozed_until: datetime | None
    note: str | None  # the person's own note

    @property
    def history_note(self) -> str | None:
        """The action row's note: where it was assigned or snoozed to, then the note."""
        head = None
        if self.action == "assigned":
            head = f"to {self.assignee}"
        elif self.action == "snoozed" and self.snoozed_until is not None:
            head = f"until {self.snoozed_until.isoformat()}"
        parts = [p for p in (head, self.note) if p]
        return ": ".join(parts) or None


def decide(
    item: Item,
    action: str,
    actor: str,
    now: datetime,
    *,
    to: str | None = None,
    until: datetime | None = None,
    note: str | None = None,
) -> Step:
    """The step ``action`` takes ``item`` to, or :class:`RefusedAction` saying why not.

    * ``acknowledged`` — from open or snoozed (it wakes a snoozed item);
    * ``assigned`` — to someone other than the current assignee; the status stays;
    * ``snoozed`` — until a time after ``now`` (snoozing again moves the time);
    * ``resolved`` — from any status but resolved.
    """
    if action not in EVENT_TYPES:
        raise RefusedAction(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    actor = _name(actor, "the actor (--by)")
    note = (note or "").strip() or None
    if note is not None and len(note) > NOTE_MAX:
        raise RefusedAction(f"the note is {len(note)} characters: at most {NOTE_MAX}")
    if item.status == "resolved":
        by = f" by {item.resolved_by}" if item.resolved_by else ""
        when = f" at {item.resolved_at.isoformat()}" if item.resolved_at else ""
        raise RefusedAction(
            f"item {item.id} is already resolved{by}{when}: nothing more to do on it "
            "(a new exception raises a new item)"
        )
    step = Step(action, actor, now, item.status, item.assignee, item.snoozed_until, note)
    if action == "acknowledged":
        if item.status == "acknowledged":
            raise RefusedAction(f"item {item.id} is already acknowledged")
        return replace(step, status="acknowledged", snoozed_until=None)
    if action == "assigned":
        assignee = _name(to or "", "the assignee")
        if assignee == item.assignee:
            raise RefusedAction(f"item {item.id} is already assigned to {assignee}")
        return replace(step, assignee=assignee)
    if action == "snoozed":
        if until is None:
            raise RefusedAction("snoozing needs a time to snooze until")
        if until.tzinfo is None:
            raise RefusedAction("the snooze time needs a time zone")
        if until <= now:
            raise RefusedAction(
                f"cannot snooze item {item.id} until {until.isoformat()}: that is not in "
                f"the future (now is {now.isoformat(timespec='seconds')})"
            )
        return replace(step, status="snoozed", snoozed_until=until)
    return replace(step, status="resolved")


def event_id(item_id: int, action: str, action_id: int) -> str:
    """The id of the timeline event an action row is: a retry of the same transaction
    appends it once, and every action (even the same one twice) has its own."""
    return str(uuid.uuid5(_NAMESPACE, f"{item_id}/{action}/{action_id}"))


def event_fields(item: Item, step: Step) -> dict[str, Any]:
    """The timeline event's fields for ``step`` on ``item`` (JSON-able)."""
    fields: dict[str, Any] = {
        "actor": step.actor,
        "worklist.item": item.id,
        "worklist.reason": item.reason,
    }
    if step.assignee:
        fields["worklist.assignee"] = step.assignee
    if step.action == "snoozed" and step.snoozed_until is not None:
        fields["worklist.snoozed_until"] = step.snoozed_until.isoformat()
    if step.note:
        fields["worklist.note"] = step.note
    return fields


def _name(value: str, what: str) -> str:
    name = value.strip()
    if not name:
        raise RefusedAction(f"{what} is empty: give a user name")
    if len(name) > NAME_MAX or not name.isprintable():
        raise RefusedAction(f"{what} must be a printable name of at most {NAME_MAX} characters")
    return name


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class WorklistQueries(DriverQueries):
    def __init__(self, dbapi_connection: Any, dialect: str) -> None:
        super().__init__(dbapi_connection, dialect)
        m = self.mark
        open_ = ", ".join(f"'{s}'" for s in OPEN_STATUSES)
        cols = ", ".join(_COLUMNS)
        lock = "" if self.sqlite else " FOR UPDATE"
        self.sql = {
            "insert": "INSERT INTO worklist_items (key, referral_id, message_id, reason, detail, "
            "owner, status, state, due_at, created_at, updated_at) "
            f"VALUES ({m}, {m}, {m}, {m}, {m}, {m}, 'open', {m}, {m}, {m}, {m}) "
            "ON CONFLICT (key) DO NOTHING",
            "resolve_moved": f"UPDATE worklist_items SET status = 'resolved', resolved_at = {m}, "
            f"resolved_by = '{ENGINE_ACTOR}', updated_at = {m} WHERE referral_id = {m} "
            f"AND state IS NOT NULL AND state <> {m} AND status IN ({open_})",
            # The second term is "snoozed, and the snooze is over", switched on by a flag.
            "search": f"SELECT {cols} FROM worklist_items WHERE ({self.among('status')} "
            f"OR ({m} AND status = 'snoozed' AND snoozed_until <= {m})) "
            # CAST: PostgreSQL cannot infer the type of a parameter only compared to NULL.
            f"AND (CAST({m} AS TEXT) IS NULL OR reason = {m}) "
            f"AND (CAST({m} AS TEXT) IS NULL OR owner = {m} OR assignee = {m}) "
            f"AND (CAST({m} AS TEXT) IS NULL OR referral_id LIKE {m}) "
            "ORDER BY CASE WHEN due_at IS NULL THEN 1 ELSE 0 END, due_at, created_at, id "
            f"LIMIT {m}",
            "get": f"SELECT {cols} FROM worklist_items WHERE id = {m}",
            "get_lock": f"SELECT {cols} FROM worklist_items WHERE id = {m}{lock}",
            "history": "SELECT id, item_id, action, actor, at, note FROM worklist_actions "
            f"WHERE item_id = {m} ORDER BY at, id",
            "open_counts": "SELECT reason, COUNT(*) FROM worklist_items WHERE status IN "
            f"('open', 'acknowledged') OR (status = 'snoozed' AND snoozed_until <= {m}) "
            "GROUP BY reason",
            # Only from the status the action was decided on: a change in between
            # (the engine resolved it, someone else acted) refuses rather than overwrites.
            "update": f"UPDATE worklist_items SET status = {m}, assignee = {m}, "
            f"snoozed_until = {m}, updated_at = {m}, resolved_at = {m}, resolved_by = {m} "
            f"WHERE id = {m} AND status = {m}",
            "insert_action": "INSERT INTO worklist_actions (item_id, action, actor, at, note) "
            f"VALUES ({m}, {m}, {m}, {m}, {m}) RETURNING id",
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

    # -- reads -------------------------------------------------------------------------

    def search(
        self,
        now: datetime,
        *,
        view: str = "open",
        reason: str | None = None,
        owner: str | None = None,
        referral: str | None = None,
        limit: int = 1000,
    ) -> list[Item]:
        """Items in ``view`` (:data:`VIEWS`; "open" is what needs a human at ``now``),
        due first (overdue at the top), then oldest. ``owner`` matches the owner or the
        assignee; ``referral`` is a referral id or its first characters."""
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}: one of {', '.join(VIEWS)}")
        statuses = {"open": ("open", "acknowledged"), "all": STATUSES}.get(view, (view,))
        prefix = None if referral is None else referral.strip() + "%"
        rows = self._all(
            "search",
            self._list(statuses),
            view == "open",
            self._stamp(now),
            reason,
            reason,
            owner,
            owner,
            owner,
            prefix,
            prefix,
            limit,
        )
        return [self._item(r) for r in rows]

    def get(self, item_id: int, *, lock: bool = False) -> Item | None:
        """One item; ``lock`` holds it for the open transaction (PostgreSQL)."""
        rows = self._all("get_lock" if lock else "get", item_id)
        return self._item(rows[0]) if rows else None

    def history(self, item_id: int) -> list[Action]:
        return [
            Action(int(i), int(item), action, actor, self._time(at), note)
            for i, item, action, actor, at, note in self._all("history", item_id)
        ]

    def open_counts(self, now: datetime) -> dict[str, int]:
        """Items needing a human at ``now``, by reason (``refloop_worklist_open``)."""
        return {r: int(n) for r, n in self._all("open_counts", self._stamp(now))}

    # -- actions (in the caller's transaction) -----------------------------------------

    def apply(self, cur: Any, item: Item, step: Step) -> tuple[Item, Action]:
        """Write ``step`` (from :func:`decide` on ``item`` as read) and its history row on
        ``cur``; :class:`RefusedAction` when the item is no longer as read."""
        stamp = self._stamp(step.at)
        resolved = step.status == "resolved"
        cur.execute(
            self.sql["update"],
            (
                step.status,
                step.assignee,
                None if step.snoozed_until is None else self._stamp(step.snoozed_until),
                stamp,
                stamp if resolved else None,
                step.actor if resolved else None,
                item.id,
                item.status,
            ),
        )
        if cur.rowcount != 1:
            raise RefusedAction(
                f"item {item.id} changed while this action was being taken "
                f"(it was {item.status}): look at it again with `refloop worklist show {item.id}`"
            )
        note = step.history_note
        cur.execute(self.sql["insert_action"], (item.id, step.action, step.actor, stamp, note))
        action_id = int(cur.fetchone()[0])
        after = replace(
            item,
            status=step.status,
            assignee=step.assignee,
            snoozed_until=step.snoozed_until,
            updated_at=step.at,
            resolved_at=step.at if resolved else None,
            resolved_by=step.actor if resolved else None,
        )
        return after, Action(action_id, item.id, step.action, step.actor, step.at, note)

    def _item(self, row: tuple[Any, ...]) -> Item:
        v = dict(zip(_COLUMNS, row, strict=True))
        return Item(
            id=int(v["id"]),
            key=v["key"],
            referral_id=v["referral_id"],
            message_id=None if v["message_id"] is None else int(v["message_id"]),
            reason=v["reason"],
            detail=v["detail"] or "",
            owner=v["owner"],
            assignee=v["assignee"],
            status=v["status"],
            state=v["state"],
            due_at=self._maybe_time(v["due_at"]),
            snoozed_until=self._maybe_time(v["snoozed_until"]),
            created_at=self._time(v["created_at"]),
            updated_at=self._time(v["updated_at"]),
            resolved_at=self._maybe_time(v["resolved_at"]),
            resolved_by=v["resolved_by"],
        )
