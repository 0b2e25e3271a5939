"""The referral state machine (pure): where a referral stands, and what an event does to it.

Theory of operation
-------------------
A referral moves along one main path,

    created → auth_pending → sent → accepted → scheduled → completed → note_received → closed

with side states ``no_show`` and ``appointment_cancelled`` (both wait for a rebooking)
and the terminal ``declined`` and ``cancelled``. It is harmonised with the 360X/BSeR
Task state machine: every state has a ``Task.status`` and a BSeR ``businessStatus``
(STU2 ballot codes), see :data:`BSER`.

Messages arrive late, twice and out of order, and 360X says status changes "may not
occur serially". So :func:`decide` lets a referral skip *forward* (a booking for a
referral we never saw accepted means it was accepted), treats a repeat as a no-op, and
turns everything else — moving backwards, acting on a closed referral — into an
**anomaly**: recorded with its reason, state unchanged. It never raises: an event the
table does not allow is information for a coordinator, not a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    CREATED = "created"
    AUTH_PENDING = "auth_pending"
    SENT = "sent"
    ACCEPTED = "accepted"
    SCHEDULED = "scheduled"
    NO_SHOW = "no_show"
    APPOINTMENT_CANCELLED = "appointment_cancelled"
    COMPLETED = "completed"
    NOTE_RECEIVED = "note_received"
    CLOSED = "closed"
    DECLINED = "declined"
    CANCELLED = "cancelled"


class Event(StrEnum):
    REFERRAL_CREATED = "referral.created"
    REFERRAL_UPDATED = "referral.updated"
    REFERRAL_CANCELLED = "referral.cancelled"
    REFERRAL_SENT = "referral.sent"
    REFERRAL_DELIVERED = "referral.delivered"
    REFERRAL_ACCEPTED = "referral.accepted"
    REFERRAL_DECLINED = "referral.declined"
    AUTHORIZATION_PENDING = "authorization.pending"
    AUTHORIZATION_APPROVED = "authorization.approved"
    AUTHORIZATION_DENIED = "authorization.denied"
    APPOINTMENT_BOOKED = "appointment.booked"
    APPOINTMENT_RESCHEDULED = "appointment.rescheduled"
    APPOINTMENT_CANCELLED = "appointment.cancelled"
    APPOINTMENT_NO_SHOW = "appointment.no_show"
    APPOINTMENT_COMPLETED = "appointment.completed"
    CONSULT_NOTE_RECEIVED = "consult_note.received"
    CONSULT_NOTE_AMENDED = "consult_note.amended"
    REFERRAL_CLOSED = "referral.closed"
    REFERRAL_ESCALATED = "referral.escalated"
    # Referral policy (engine.policy, engine.services.policy_runtime) and the people who
    # work its exceptions: recorded on the timeline, never moving the state, except a
    # coordinator closing a referral by hand.
    REFERRAL_CLOSED_BY_HAND = "referral.closed_by_hand"
    WORKLIST_ACKNOWLEDGED = "worklist.acknowledged"
    WORKLIST_ASSIGNED = "worklist.assigned"
    WORKLIST_SNOOZED = "worklist.snoozed"
    WORKLIST_RESOLVED = "worklist.resolved"
    PATIENT_REPLIED = "patient.replied"
    OUTREACH_PLANNED = "outreach.planned"
    OUTREACH_SKIPPED = "outreach.skipped"
    # Outcomes of outbound deliveries (engine.services.dispatcher): recorded on the
    # referral's timeline, never moving its state (a packet's success is referral.sent).
    DELIVERY_SUCCEEDED = "delivery.succeeded"
    DELIVERY_FAILED = "delivery.failed"


S = State
TERMINAL = frozenset({S.CLOSED, S.DECLINED, S.CANCELLED})
#: Position on the main path; side states sit where the rebooking resumes.
RANK = {
    S.CREATED: 0,
    S.AUTH_PENDING: 1,
    S.SENT: 2,
    S.ACCEPTED: 3,
    S.APPOINTMENT_CANCELLED: 3,
    S.NO_SHOW: 4,
    S.SCHEDULED: 4,
    S.COMPLETED: 5,
    S.NOTE_RECEIVED: 6,
    S.CLOSED: 7,
}

#: (Task.status, BSeR businessStatus) for each state.
BSER: dict[State, tuple[str, str]] = {
    S.CREATED: ("requested", "2.0"),
    S.AUTH_PENDING: ("on-hold", "2.0"),
    S.SENT: ("received", "2.0"),
    S.ACCEPTED: ("accepted", "3.0"),
    S.SCHEDULED: ("in-progress", "5.1.1"),
    S.NO_SHOW: ("in-progress", "5.1.2"),
    S.APPOINTMENT_CANCELLED: ("in-progress", "5.1.3"),
    S.COMPLETED: ("in-progress", "5.1.4"),
    S.NOTE_RECEIVED: ("completed", "7.0"),
    S.CLOSED: ("completed", "7.0"),
    S.DECLINED: ("rejected", "4.0"),
    S.CANCELLED: ("cancelled", "6.0"),
}


@dataclass(frozen=True, slots=True)
class Decision:
    state: State | None  # None only while no referral exists yet
    changed: bool
    anomaly: str | None = None  # why the event was not applied


_Rule = Callable[[State], Decision]


def _forward(target: State, *, allowed_from: frozenset[State] | None = None) -> _Rule:
    """Move to ``target`` from any earlier non-terminal state (or from ``allowed_from``)."""

    def rule(state: State) -> Decision:
        if state == target:
            return Decision(state, changed=False)
        if state not in TERMINAL and target in RANK:
            behind = RANK[state] > RANK[target] if allowed_from else RANK[state] >= RANK[target]
            if behind:
                # A late receipt (a booking after the visit, an acceptance after the
                # appointment was cancelled): the referral is already that far.
                return Decision(state, changed=False)
        ok = (
            state in allowed_from
            if allowed_from is not None
            else state not in TERMINAL and RANK[state] < RANK[target]
        )
        if ok:
            return Decision(target, changed=True)
        return _anomaly(state, f"cannot move from {state} to {target}")

    return rule


def _resend() -> _Rule:
    forward = _forward(S.SENT)

    def rule(state: State) -> Decision:
        if state is S.DECLINED:
            return Decision(S.SENT, changed=True)
        return forward(state)

    return rule


def _stay() -> _Rule:
    def rule(state: State) -> Decision:
        if state in TERMINAL:
            return _anomaly(state, f"referral is already {state}")
        return Decision(state, changed=False)

    return rule


def _record() -> _Rule:
    """Kept on the timeline in any state: a write-back of a closed referral may still
    succeed or fail, and either is worth knowing."""

    def rule(state: State) -> Decision:
        return Decision(state, changed=False)

    return rule


def _anomaly(state: State, reason: str) -> Decision:
    return Decision(state, changed=False, anomaly=reason)


_OPEN = frozenset(s for s in State if s not in TERMINAL)
_BEFORE_VISIT = frozenset(
    {S.CREATED, S.AUTH_PENDING, S.SENT, S.ACCEPTED, S.SCHEDULED, S.NO_SHOW, S.APPOINTMENT_CANCELLED}
)
# BSeR: the recipient may decline from received, accepted and 5.1.x "active" — including
# after the visit (5.1.4) but not once the appointment was cancelled (5.1.3).
_DECLINABLE = (_BEFORE_VISIT - {S.APPOINTMENT_CANCELLED}) | {S.COMPLETED}
# BSeR: a cancellation is no longer possible once the outcome (the note, 7.0) is back.
_CANCELLABLE = _OPEN - {S.NOTE_RECEIVED}


def _when(table: dict[State, State], otherwise: str) -> _Rule:
    def rule(state: State) -> Decision:
        if state in table:
            target = table[state]
            return Decision(target, changed=target != state)
        return _anomaly(state, otherwise.format(state=state))

    return rule


RULES: dict[Event, _Rule] = {
    Event.REFERRAL_UPDATED: _stay(),
    Event.REFERRAL_ESCALATED: _stay(),
    Event.REFERRAL_DELIVERED: _stay(),
    Event.DELIVERY_SUCCEEDED: _record(),
    Event.DELIVERY_FAILED: _record(),
    Event.AUTHORIZATION_PENDING: _when(
        {S.CREATED: S.AUTH_PENDING, S.AUTH_PENDING: S.AUTH_PENDING},
        "authorization requested for a referral that is already {state}",
    ),
    Event.AUTHORIZATION_APPROVED: _when(
        {S.AUTH_PENDING: S.CREATED, **{s: s for s in _OPEN if s != S.AUTH_PENDING}},
        "authorization approved for a referral that is already {state}",
    ),
    # A denial keeps the referral waiting on the coordinator's worklist: no packet leaves.
    Event.AUTHORIZATION_DENIED: _when(
        {S.AUTH_PENDING: S.AUTH_PENDING, S.CREATED: S.AUTH_PENDING},
        "authorization denied for a referral that is already {state}",
    ),
    # A declined referral re-routed to the next specialist (routing's packet_after_decline)
    # is sent again: the only way out of a terminal state, and only by a new packet.
    Event.REFERRAL_SENT: _resend(),
    Event.REFERRAL_ACCEPTED: _forward(S.ACCEPTED),
    Event.REFERRAL_DECLINED: _forward(S.DECLINED, allowed_from=_DECLINABLE),
    Event.REFERRAL_CANCELLED: _forward(S.CANCELLED, allowed_from=_CANCELLABLE),
    Event.APPOINTMENT_BOOKED: _forward(S.SCHEDULED, allowed_from=_BEFORE_VISIT),
    Event.APPOINTMENT_RESCHEDULED: _forward(S.SCHEDULED, allowed_from=_BEFORE_VISIT),
    Event.APPOINTMENT_CANCELLED: _when(
        {
            S.SCHEDULED: S.APPOINTMENT_CANCELLED,
            S.NO_SHOW: S.APPOINTMENT_CANCELLED,
            S.APPOINTMENT_CANCELLED: S.APPOINTMENT_CANCELLED,
        },
        "appointment cancelled for a referral that is {state}",
    ),
    Event.APPOINTMENT_NO_SHOW: _when(
        {S.SCHEDULED: S.NO_SHOW, S.NO_SHOW: S.NO_SHOW},
        "no-show reported for a referral that is {state}",
    ),
    Event.APPOINTMENT_COMPLETED: _forward(S.COMPLETED, allowed_from=_BEFORE_VISIT),
    Event.CONSULT_NOTE_RECEIVED: _forward(
        S.NOTE_RECEIVED, allowed_from=_BEFORE_VISIT | {S.COMPLETED}
    ),
    Event.CONSULT_NOTE_AMENDED: _when(
        {S.NOTE_RECEIVED: S.NOTE_RECEIVED, S.CLOSED: S.CLOSED},
        "consult note amended for a referral that is {state} (no note yet)",
    ),
    Event.WORKLIST_ACKNOWLEDGED: _record(),
    Event.WORKLIST_ASSIGNED: _record(),
    Event.WORKLIST_SNOOZED: _record(),
    Event.WORKLIST_RESOLVED: _record(),
    Event.PATIENT_REPLIED: _record(),
    Event.OUTREACH_PLANNED: _record(),
    Event.OUTREACH_SKIPPED: _record(),
    # A coordinator may close any open referral (the patient went elsewhere, the need
    # passed); the event says who did it.
    Event.REFERRAL_CLOSED_BY_HAND: _when(
        {**{s: S.CLOSED for s in _OPEN}, S.CLOSED: S.CLOSED},
        "cannot close a referral that is {state}",
    ),
    Event.REFERRAL_CLOSED: _when(
        {S.NOTE_RECEIVED: S.CLOSED, S.CLOSED: S.CLOSED},
        "cannot close a referral that is {state}: the loop closes on the consult note",
    ),
}


def decide(state: State | None, event: Event) -> Decision:
    """What ``event`` does to a referral in ``state`` (None: no referral yet)."""
    if state is None:
        if event is Event.REFERRAL_CREATED:
            return Decision(S.CREATED, changed=True)
        return Decision(None, changed=False, anomaly=f"{event} for a referral that does not exist")
    if event is Event.REFERRAL_CREATED:
        return Decision(state, changed=False)  # a resent order: already known
    return RULES[event](state)
