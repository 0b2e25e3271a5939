"""The referral policy in the engine's transactions: timers, exceptions, events by hand.

Theory of operation
-------------------
Every writer of the event log (the normaliser's batches, the dispatcher's delivery
outcomes, the scheduler, a coordinator's action) ends in :meth:`EventLog.write` with a
:class:`~engine.store.eventlog.Changes`. Before it writes, it passes the changes through
:func:`with_policy`, which refolds each touched referral's new events in sequence from
the projection the store holds (the state before the batch) and asks the pure policy
(:func:`engine.policy.timers.on_transition`) what each one arms and clears, given the
referral's pending timers. So a timer is set and cleared in the same transaction as the
state change that causes it, whoever wrote the event.

The same pass raises the exceptions an event is by itself — a dead-lettered delivery, a
no-show, an authorization hold or denial, a match made by the patient + specialty
heuristic, a patient's reply — as worklist items keyed by the event id (a replay raises
nothing twice). An item raised for a state resolves itself once the referral leaves it,
and a state change cancels the referral's outreach still waiting in the outbox: a nudge
planned for a referral that has moved on is never sent.

Events that come from no message (an action by hand, a reply, a timer) go through
:func:`append`, which folds them like the pipeline does, and :func:`record`, which does
append + policy + write in one transaction holding the event log's writer turn.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from engine.domain.projection import LoggedEvent, Referral, fold
from engine.domain.referral import Event, State
from engine.policy.language import Policy
from engine.policy.timers import Timer, on_transition
from engine.services.pipeline import Route, canonical_json, delivery_row, trigger_for
from engine.store.eventlog import Changes, EventLog, EventRow, LogConnection
from engine.store.outbox import NewDelivery
from engine.store.worklist import Moved, NewItem

__all__ = [
    "EVENT_ITEMS",
    "NewEvent",
    "UnknownReferral",
    "append",
    "item_key",
    "merge",
    "record",
    "with_policy",
]

_NAMESPACE = uuid.UUID("5d0f3b8a-61c2-4c8e-9a57-3c1f2b7d9e40")
#: Why outreach still waiting in the outbox was cancelled by a state change.
MOVED_ON = "the referral moved on"
#: Below this a correlation was a guess (the patient + specialty heuristic), as
#: engine.domain.correlation.Match.needs_review has it.
CONFIDENT = 0.9


def item_key(cause: str, reason: str) -> str:
    """A worklist item's key: one item per cause (an event, a timer effect) and reason."""
    return str(uuid.uuid5(_NAMESPACE, f"{cause}/{reason}"))


#: Events that are an exception by themselves: reason, and whether the item is about
#: the state the event leaves the referral in (it resolves once the referral leaves it).
EVENT_ITEMS: Mapping[Event, tuple[str, bool]] = {
    Event.DELIVERY_FAILED: ("delivery_dead_lettered", False),
    Event.APPOINTMENT_NO_SHOW: ("no_show", True),
    Event.AUTHORIZATION_PENDING: ("auth_hold", True),
    Event.AUTHORIZATION_DENIED: ("authorization_denied", True),
    Event.PATIENT_REPLIED: ("patient_reply", False),
}


class UnknownReferral(LookupError):
    def __init__(self, referral_id: str) -> None:
        super().__init__(f"no referral {referral_id} (see `refloop referrals list`)")
        self.referral_id = referral_id


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event that comes from no message: an action by hand, a reply, a timer."""

    id: str  # deterministic: derived from what caused it, so a retry appends it once
    type: Event
    fields: Mapping[str, Any]
    occurred_at: datetime
    rule_id: str = ""
    method: str = "manual"  # referral_events.correlation_method: manual | policy | reply


def append(
    el: EventLog,
    referral: Referral,
    events: Sequence[NewEvent],
    now: datetime,
    *,
    route: Route | None = None,
) -> tuple[Changes, Referral]:
    """Fold ``events`` into ``referral`` (ids the log already has are skipped) and, with
    ``route``, route each one applied without an anomaly. Nothing is written."""
    known = el.known_events([e.id for e in events]) if events else {}
    rows: list[EventRow] = []
    deliveries: list[NewDelivery] = []
    current = referral
    for ev in events:
        if ev.id in known or any(r.id == ev.id for r in rows):
            continue
        text = canonical_json(dict(ev.fields))
        logged = LoggedEvent(ev.type, json.loads(text), ev.occurred_at, now, 1.0)
        folded, step = fold(current, referral.id, logged)
        if folded is not None:
            current = folded
        row = EventRow(
            id=ev.id,
            referral_id=referral.id,
            sequence=step.sequence,
            type=ev.type,
            occurred_at=ev.occurred_at,
            recorded_at=now,
            message_id=None,
            mapping_id="",
            mapping_digest="",
            rule_id=ev.rule_id,
            correlation_method=ev.method,
            confidence=1.0,
            state_before=step.state_before,
            state_after=step.state_after,
            anomaly=step.anomaly,
            fields=text,
        )
        rows.append(row)
        if route is not None and not step.anomaly:
            trigger = trigger_for(row, logged, current, "")
            routed, _ = route(trigger)
            deliveries += [delivery_row(referral.id, ev.id, d) for d in routed]
    if not rows:
        return Changes(), referral
    return Changes(referrals=[current], events=rows, deliveries=deliveries), current


def with_policy(
    el: EventLog,
    policy: Policy,
    changes: Changes,
    now: datetime,
    *,
    stored: Mapping[str, Referral] | None = None,
) -> Changes:
    """``changes`` plus what the policy makes of its events (see the module docstring).
    Reads the touched referrals' stored projections (those not in ``stored``, which a
    caller that has just read them passes) and pending timers: call it inside the
    writer's transaction, before :meth:`EventLog.write`."""
    if not changes.events:
        return changes
    by_referral: dict[str, list[EventRow]] = defaultdict(list)
    for row in changes.events:
        by_referral[row.referral_id].append(row)
    ids = sorted(by_referral)
    if not policy.rules():
        return _without_timers(changes, by_referral)
    # A referral whose first new event is its creation has no stored row and no timers.
    existing = [rid for rid in ids if min(r.sequence for r in by_referral[rid]) > 1]
    before = dict(stored or {})
    missing = [rid for rid in existing if rid not in before]
    if missing:
        before.update({r.id: r for r in el.referrals(missing)})
    pending: dict[str, dict[str, Timer]] = defaultdict(dict)
    if policy.rules() and existing:
        for t in el.timers.pending(existing):
            pending[t.referral_id][t.id] = t
    armed: dict[str, Timer] = {t.id: t for t in changes.timers}
    cleared: list[str] = list(changes.cleared_timers)
    items: list[NewItem] = list(changes.worklist)
    moved: list[Moved] = list(changes.moved)
    stop: list[tuple[str, str]] = list(changes.stop_outreach)
    for rid in ids:
        current = before.get(rid)
        timers = pending[rid]
        timers.update({t.id: t for t in changes.timers if t.referral_id == rid})
        state_changed = False
        for row in sorted(by_referral[rid], key=lambda r: r.sequence):
            logged = LoggedEvent(
                row.type, json.loads(row.fields), row.occurred_at, row.recorded_at, row.confidence
            )
            folded, step = fold(current, rid, logged)
            if folded is None:
                continue
            current = folded
            if step.anomaly:
                continue
            decision = on_transition(
                policy,
                folded,
                step.state_before,
                folded.state,
                row.type,
                row.occurred_at,
                pending=list(timers.values()),
            )
            for tid in decision.clear:
                timers.pop(tid, None)
                armed.pop(tid, None)
                cleared.append(tid)
            for t in decision.set:
                timers[t.id] = t
                armed[t.id] = t
            items += _event_items(row, folded.state)
            if step.state_before is not None and step.state_before != folded.state:
                state_changed = True
        if state_changed and current is not None:
            moved.append(Moved(rid, current.state.value))
            stop.append((rid, MOVED_ON))
    return replace(
        changes,
        timers=list(armed.values()),
        cleared_timers=list(dict.fromkeys(cleared)),
        worklist=items,
        moved=moved,
        stop_outreach=list(dict.fromkeys(stop)),
    )


def _without_timers(changes: Changes, by_referral: Mapping[str, list[EventRow]]) -> Changes:
    """An empty policy arms nothing: the rows' own state columns say enough for the
    event-driven items and the state changes (no refold, no reads)."""
    items: list[NewItem] = list(changes.worklist)
    moved: list[Moved] = list(changes.moved)
    stop: list[tuple[str, str]] = list(changes.stop_outreach)
    for rid, rows in sorted(by_referral.items()):
        last: State | None = None
        changed = False
        for row in sorted(rows, key=lambda r: r.sequence):
            if row.anomaly or row.state_after is None:
                continue
            items += _event_items(row, row.state_after)
            changed = changed or (
                row.state_before is not None and row.state_before != row.state_after
            )
            last = row.state_after
        if changed and last is not None:
            moved.append(Moved(rid, last.value))
            stop.append((rid, MOVED_ON))
    return replace(changes, worklist=items, moved=moved, stop_outreach=list(dict.fromkeys(stop)))


def record(
    log: LogConnection,
    referral_id: str,
    events: Sequence[NewEvent],
    now: datetime,
    *,
    policy: Policy,
    route: Route | None = None,
    extra: Changes | None = None,
) -> list[EventRow]:
    """Append ``events`` to one referral in one transaction holding the event log's
    writer turn, with the policy's timers and items; returns the rows appended (none
    when every id was already in the log)."""
    el = log.eventlog
    el.begin(wait=True)
    try:
        found = el.referrals([referral_id])
        if not found:
            raise UnknownReferral(referral_id)
        changes, _ = append(el, found[0], events, now, route=route)
        if extra is not None:
            changes = merge(changes, extra)
        changes = with_policy(el, policy, changes, now)
        el.write(changes, now)
        el.commit()
    except BaseException:
        el.end()
        raise
    return list(changes.events)


def _event_items(row: EventRow, state: State) -> list[NewItem]:
    out: list[NewItem] = []
    spec = EVENT_ITEMS.get(row.type)
    if spec is not None:
        reason, stateful = spec
        out.append(
            NewItem(
                key=item_key(row.id, reason),
                reason=reason,
                referral_id=row.referral_id,
                state=state.value if stateful else None,
                detail=_detail(row),
            )
        )
    if row.confidence < CONFIDENT:
        out.append(
            NewItem(
                key=item_key(row.id, "low_confidence_correlation"),
                reason="low_confidence_correlation",
                referral_id=row.referral_id,
                detail=f"{row.type.value} matched by {row.correlation_method} "
                f"(confidence {row.confidence:.2f}): confirm it is this referral's",
            )
        )
    return out


def _detail(row: EventRow) -> str:
    """Safe text for the coordinator: configuration and codes, never patient data."""
    fields = json.loads(row.fields)
    if row.type is Event.DELIVERY_FAILED:
        channel = fields.get("delivery.channel", "")
        kind = fields.get("delivery.kind", "")
        error = str(fields.get("delivery.error") or "")[:200]
        return f"{kind} on channel {channel} dead-lettered: {error}".strip()
    if row.type is Event.PATIENT_REPLIED:
        keyword = fields.get("reply.keyword") or "a message"
        return f"the patient replied ({keyword}) by {fields.get('reply.channel', 'sms')}"
    if row.type is Event.AUTHORIZATION_PENDING and row.rule_id:
        return f"authorization required ({row.rule_id}): no packet leaves until it is approved"
    return ""


def merge(a: Changes, b: Changes) -> Changes:
    """Both sets of changes, as one transaction writes them (the later projection wins)."""

    def both(name: str) -> list[Any]:
        return [*getattr(a, name), *getattr(b, name)]

    return Changes(
        messages=both("messages"),
        referrals=_last_per_referral([*a.referrals, *b.referrals]),
        events=both("events"),
        keys=both("keys"),
        unpark=both("unpark"),
        deliveries=both("deliveries"),
        timers=both("timers"),
        cleared_timers=both("cleared_timers"),
        fired_timers=both("fired_timers"),
        worklist=both("worklist"),
        moved=both("moved"),
        stop_outreach=both("stop_outreach"),
    )


def _last_per_referral(referrals: Iterable[Referral]) -> list[Referral]:
    out: dict[str, Referral] = {}
    for r in referrals:
        if r.id not in out or r.sequence >= out[r.id].sequence:
            out[r.id] = r
    return list(out.values())
