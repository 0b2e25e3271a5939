"""Planning a normaliser batch (pure): normalised messages + what the store knows → changes.

Theory of operation
-------------------
The store answers a few lookups for the whole batch (indexed keys, the referrals they
name, open referrals of the batch's patients, event ids already in the log, and — for
the keys the batch indexes anew — parked messages waiting for them); :func:`plan` then
walks the messages in id order and decides everything else in memory, so the batch
costs a fixed number of queries whatever its size.

For each event of a processed message, in ordinal order:

* an id the log already has was applied before (a replay): nothing to do;
* otherwise :func:`~engine.domain.correlation.correlate` finds its referral. A
  ``referral.created`` that matches nothing starts a referral (its id derived from the
  event's, so a replay finds the same one); any other event that matches nothing — or
  matches two referrals — parks the **whole message**: none of its events is applied,
  and the keys it offers are remembered so it is retried the moment one is indexed;
* the event is folded into the projection (:func:`engine.domain.projection.fold`),
  and the keys it carries become the referral's.

A message's changes are staged and kept only if the whole message goes through.

Outbound: each event applied without an anomaly is offered to the router (the analysts'
routes, :mod:`engine.outbound.routing`) together with the referral as it stands right
after it; the deliveries it decides on are staged with the event, so they commit in the
same transaction (the transactional outbox). What the router could not place (no
specialist for the specialty, no write-back for the source) becomes a warning on the
message, visible in ``refloop messages show``.

Pre-authorization: with ``needs_auth`` (the payer table,
:func:`engine.policy.authorization.requires`), a ``referral.created`` that starts a
referral the table holds is followed, in the same message, by a synthetic
``authorization.pending`` (id: a UUID 5 of the created event's id, so a replay stages it
once; rule ``auth:<table rule>``). Both are folded before anything is routed, so the
created event is routed with the referral already in ``auth_pending``: the packet route
(``when: state: created``) does not fire, and the packet leaves on
``authorization.approved`` instead (its route, ``when: state_before: auth_pending``).

Routing exceptions: an unrouted reason that ends in a worklist code (``[no_specialist]``,
``[no_in_network_specialist]``, ``[declined_no_alternative]``, see
:func:`engine.outbound.routing.unrouted_code`) also becomes a worklist item on the
referral (key: a UUID 5 of the event id and the code), raised for the state the event
left it in. On a ``referral.declined`` the pipeline adds the specialist who had the
packet (the referral's last ``delivery.recipient``) to the referral's ``routing.tried``
list, so the decline route sends the packet to someone who has not had it yet.

Order: per referral, events are applied in message id order. When a message's new keys
release parked messages (older, so smaller ids), the batch is cut right after it: the
released messages are ``received`` again and the next batch takes them before anything
newer, exactly as if they had arrived in order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import chain
from typing import Any

from engine.domain.correlation import Clues, Key, OpenReferral, correlate
from engine.domain.events import CanonicalEvent, Diagnostic, Normalised, Outcome, event_id
from engine.domain.projection import LoggedEvent, Referral, fold
from engine.domain.referral import TERMINAL, Event
from engine.outbound.model import DeliveryRequest, ReferralView, Trigger, TriggerEvent
from engine.outbound.routing import TRIED_FIELD, unrouted_code
from engine.store.eventlog import Changes, EventRow, MessageUpdate
from engine.store.outbox import NewDelivery
from engine.store.worklist import NewItem

#: The router: a trigger → (deliveries to enqueue, reasons nothing could be routed).
Route = Callable[[Trigger], tuple[Sequence[DeliveryRequest], Sequence[str]]]
#: The pre-authorization table's question: the rule that holds this referral, or None.
NeedsAuth = Callable[[Referral], str | None]

_REFERRAL_NAMESPACE = uuid.UUID("0b7f8e36-3f5c-4f55-a0f4-2b8d6a3c9e11")
_AUTH_NAMESPACE = uuid.UUID("3c8d2a51-7e0f-4b6a-9d14-5a2e8f61c7b3")


def pending_id_for(created_event_id: str) -> str:
    """The synthetic ``authorization.pending`` of a held referral (stable on replay)."""
    return str(uuid.uuid5(_AUTH_NAMESPACE, created_event_id))


def routing_item(event_id: str, code: str, referral_id: str, state: str) -> NewItem:
    """The worklist item for a routing exception of one event."""
    return NewItem(
        key=str(uuid.uuid5(uuid.UUID(event_id), code)),
        reason=code,
        referral_id=referral_id,
        state=state,
        detail=_ROUTING_DETAIL.get(code, ""),
    )


_ROUTING_DETAIL = {
    "no_specialist": "no specialist in the directory for this referral: name one, or add "
    "one to the directory (see `refloop messages show`)",
    "no_in_network_specialist": "no specialist in the directory takes the patient's plan "
    "for this specialty: arrange an out-of-network referral or a new directory entry",
    "declined_no_alternative": "the specialist declined and no other one in the directory "
    "can take the referral: find another specialist",
}


def referral_id_for(created_event_id: str) -> str:
    """A new referral's id, derived from the event that created it (stable on replay)."""
    return str(uuid.uuid5(_REFERRAL_NAMESPACE, created_event_id))


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message of the batch, already normalised."""

    message_id: int
    received_at: datetime
    result: Normalised
    source: str = ""  # the listener (or FHIR source) it arrived on


@dataclass(frozen=True, slots=True)
class Known:
    """What the store said before planning (each a single query for the batch).
    ``parked`` need only cover the keys the batch indexes anew (see normaliser)."""

    index: Mapping[Key, frozenset[str]] = field(default_factory=dict)
    referrals: Mapping[str, Referral] = field(default_factory=dict)  # by key and by patient
    events: Mapping[str, str] = field(default_factory=dict)  # event id → referral id
    parked: Sequence[tuple[int, Key]] = ()  # (message id, a key it waits for)


@dataclass(frozen=True, slots=True)
class Report:
    """What happened to one message: for the replay command, metrics and logs."""

    message_id: int
    status: str
    new_events: tuple[str, ...] = ()  # event types appended
    known_events: int = 0  # already in the log (a replay)
    referrals: tuple[str, ...] = ()
    created: tuple[str, ...] = ()  # referrals this message started
    anomalies: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()  # correlation methods used
    unparked: tuple[int, ...] = ()  # parked messages it released
    diagnostics: tuple[Diagnostic, ...] = ()
    mapping_id: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    changes: Changes
    reports: tuple[Report, ...]
    handled: int  # messages planned; the rest of the batch is left for the next one


def lookup_values(results: Iterable[Normalised]) -> set[str]:
    """The key values a batch's events carry: what to look up in the key index."""
    values: set[str] = set()
    for r in results:
        if r.outcome is Outcome.PROCESSED:
            for ev in r.events:
                values.update(k.value for k in keys_of(ev))
    return values


def keys_of(ev: CanonicalEvent) -> tuple[Key, ...]:
    """What an event is correlated by, and indexed under once applied: its ``correlate.*``
    keys and its appointment id. An appointment id matches only after a booking linked
    it to a referral, so offering it to :func:`correlate` is safe — and it is how an S14
    or S15 that names only the appointment finds its referral."""
    return tuple(dict.fromkeys(k.normalised() for k in ev.keys()))  # noqa: SIM118 - not a dict


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def occurred_at(ev: CanonicalEvent, fallback: datetime) -> datetime:
    """The event's business time (``occurred_at``, ISO 8601), else when it was received."""
    raw = ev.fields.get("occurred_at")
    if isinstance(raw, str):
        try:
            moment = datetime.fromisoformat(raw)
        except ValueError:
            return fallback
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return fallback


def _releases(waiting: Key, new: Key) -> bool:
    # A parked message that named no assigner is released by any assigner's key.
    return (
        waiting.kind is new.kind
        and waiting.value == new.value
        and waiting.assigner in ("", new.assigner)
    )


class _Batch:
    """Mutable planning state for one batch."""

    def __init__(
        self, known: Known, now: datetime, route: Route | None, needs_auth: NeedsAuth | None
    ) -> None:
        self.now = now
        self.route = route
        self.needs_auth = needs_auth
        self.deliveries: list[NewDelivery] = []
        self.worklist: list[NewItem] = []
        self.index: dict[Key, frozenset[str]] = dict(known.index)
        self.referrals: dict[str, Referral] = dict(known.referrals)
        self.logged: dict[str, str] = dict(known.events)
        self.parked_outside: list[tuple[int, Key]] = list(known.parked)
        self.changed: dict[str, Referral] = {}
        self.events: list[EventRow] = []
        self.keys: list[tuple[Key, str]] = []
        self.updates: dict[int, MessageUpdate] = {}
        self.reports: dict[int, Report] = {}
        self.unpark: list[int] = []
        self.parked_here: set[int] = set()  # parked earlier in this batch

    def open_referrals(
        self, staged: Mapping[str, Referral], patient: str
    ) -> Iterator[OpenReferral]:
        """Heuristic candidates, produced only if correlation gets that far."""
        if not patient:
            return
        for rid, r in chain(staged.items(), self.referrals.items()):
            if rid in staged and r is not staged[rid]:
                continue  # superseded by this message's staged projection
            if r.patient_key == patient and r.state not in TERMINAL:
                yield OpenReferral(r.id, patient, r.specialty or "", r.created_at)


def plan(
    batch: Sequence[Inbound],
    known: Known,
    now: datetime,
    route: Route | None = None,
    *,
    needs_auth: NeedsAuth | None = None,
) -> Plan:
    """Decide what the batch does (see the module docstring)."""
    ids = {i.message_id for i in batch}
    known = replace(known, parked=[(m, k) for m, k in known.parked if m not in ids])
    state = _Batch(known, now, route, needs_auth)
    handled = 0
    for item in batch:
        handled += 1
        released = _plan_message(state, item)
        if released:
            break
    changes = Changes(
        messages=[state.updates[i.message_id] for i in batch[:handled]],
        referrals=list(state.changed.values()),
        events=state.events,
        keys=state.keys,
        unpark=state.unpark,
        deliveries=state.deliveries,
        worklist=state.worklist,
    )
    reports = tuple(state.reports[i.message_id] for i in batch[:handled])
    return Plan(changes, reports, handled)


def _plan_message(b: _Batch, item: Inbound) -> bool:
    """Plan one message; True when it released parked messages (cut the batch here)."""
    r = item.result
    mid = item.message_id
    if r.outcome is not Outcome.PROCESSED:
        b.updates[mid] = MessageUpdate(
            mid,
            r.outcome.value,
            tuple(d.as_dict() for d in r.diagnostics),
            r.mapping_id,
            r.rule_id,
        )
        b.reports[mid] = Report(
            mid, r.outcome.value, diagnostics=r.diagnostics, mapping_id=r.mapping_id
        )
        return False

    staged: dict[str, Referral] = {}
    staged_index: dict[Key, frozenset[str]] = {}
    rows: list[EventRow] = []
    keys: list[tuple[Key, str]] = []
    known_count = 0
    referrals: list[str] = []
    created: list[str] = []
    anomalies: list[str] = []
    methods: list[str] = []
    deliveries: list[NewDelivery] = []
    unrouted: list[Diagnostic] = []
    items: list[NewItem] = []
    parked_reason: str | None = None
    offered = {id(ev): keys_of(ev) for ev in r.events}  # asked for several times below
    for ev in sorted(r.events, key=lambda e: e.ordinal):
        eid = event_id(mid, ev)
        if eid in b.logged:
            known_count += 1
            referrals.append(b.logged[eid])
            continue
        when = occurred_at(ev, item.received_at)
        clues = Clues(
            keys=offered[id(ev)],
            patient=r.clues.get("patient", ""),
            specialty=r.clues.get("specialty", ""),
            occurred_at=when,
        )
        index = _Overlay(b.index, staged_index) if staged_index else b.index
        # A new order is its own referral unless its keys say otherwise: the patient +
        # specialty heuristic is for messages that lost their keys, not for orders (a
        # patient may well have two cardiology referrals).
        candidates = (
            () if ev.type is Event.REFERRAL_CREATED else b.open_referrals(staged, clues.patient)
        )
        match = correlate(clues, index, candidates)
        if match.referral_id is not None:
            rid, method, confidence = match.referral_id, match.method, match.confidence
        elif ev.type is Event.REFERRAL_CREATED and match.method == "none":
            rid, method, confidence = referral_id_for(eid), "created", 1.0
            created.append(rid)
        else:
            parked_reason = _why_parked(ev, match.method, match.candidates)
            break
        current = staged.get(rid) or b.referrals.get(rid)
        values = dict(ev.fields)
        if ev.type is Event.REFERRAL_CREATED and item.source and "source" not in values:
            values["source"] = item.source  # where write-back goes: the referral's origin
        if ev.type is Event.REFERRAL_DECLINED and current is not None:
            tried = _tried_after_decline(current)
            if tried:
                values[TRIED_FIELD] = tried
        fields_json = canonical_json(values)
        logged = LoggedEvent(ev.type, json.loads(fields_json), when, b.now, confidence)
        projection, step = fold(current, rid, logged)
        if projection is not None:
            staged[rid] = projection

        base = EventRow(
            id=eid,
            referral_id=rid,
            sequence=step.sequence,
            type=ev.type,
            occurred_at=when,
            recorded_at=b.now,
            message_id=mid,
            mapping_id=r.mapping_id,
            mapping_digest=r.mapping_digest,
            rule_id=ev.rule_id,
            correlation_method=method,
            confidence=confidence,
            state_before=step.state_before,
            state_after=step.state_after,
            anomaly=step.anomaly,
            fields=fields_json,
        )
        rows.append(base)
        # (row, logged event) of what this event applies, routed below with the referral
        # as it stands after all of them.
        applied: list[tuple[EventRow, LoggedEvent]] = [(rows[-1], logged)]
        held = (
            _held(b.needs_auth, projection)
            if ev.type is Event.REFERRAL_CREATED and step.state_before is None and not step.anomaly
            else None
        )
        if held is not None and projection is not None:
            text = canonical_json({"authorization.status": "pending"})
            pending = LoggedEvent(
                Event.AUTHORIZATION_PENDING, json.loads(text), when, b.now, confidence
            )
            projection, hold = fold(projection, rid, pending)
            assert projection is not None  # a referral exists: fold keeps it
            staged[rid] = projection
            rows.append(
                replace(
                    base,
                    id=pending_id_for(eid),
                    type=Event.AUTHORIZATION_PENDING,
                    sequence=hold.sequence,
                    rule_id=f"auth:{held}",
                    state_before=hold.state_before,
                    state_after=hold.state_after,
                    anomaly=hold.anomaly,
                    fields=text,
                )
            )
            applied.append((rows[-1], pending))
        for key in offered[id(ev)]:
            owners = b.index.get(key, frozenset()) | staged_index.get(key, frozenset())
            if rid not in owners:
                staged_index[key] = staged_index.get(key, frozenset()) | {rid}
                keys.append((key, rid))
        referrals.append(rid)
        methods.append(method)
        if step.anomaly:
            anomalies.append(step.anomaly)
        elif b.route is not None and projection is not None:
            for row, event_logged in applied:
                trigger = trigger_for(row, event_logged, projection, item.source)
                routed, reasons = b.route(trigger)
                deliveries += [delivery_row(rid, row.id, d) for d in routed]
                unrouted += [Diagnostic("unrouted", why, severity="warning") for why in reasons]
                codes = dict.fromkeys(c for c in map(unrouted_code, reasons) if c)
                items += [routing_item(row.id, c, rid, projection.state.value) for c in codes]

    rule = r.rule_id or next((e.rule_id for e in r.events if e.rule_id), "")
    diagnostics = tuple(d.as_dict() for d in r.diagnostics)
    if parked_reason is not None:
        waits = tuple(
            sorted(
                {k for keys in offered.values() for k in keys},
                key=lambda k: (k.kind.value, k.value, k.assigner),
            )
        )
        note = Diagnostic("parked", parked_reason, severity="info")
        b.updates[mid] = MessageUpdate(
            mid, "parked", (*diagnostics, note.as_dict()), r.mapping_id, rule, True, waits
        )
        b.reports[mid] = Report(
            mid,
            "parked",
            known_events=known_count,
            diagnostics=(*r.diagnostics, note),
            mapping_id=r.mapping_id,
        )
        b.parked_here.add(mid)
        return False

    # The whole message went through: keep its changes.
    b.referrals.update(staged)
    b.changed.update(staged)
    b.events.extend(rows)
    b.keys.extend(keys)
    b.deliveries.extend(deliveries)
    b.worklist.extend(items)
    diagnostics += tuple(d.as_dict() for d in unrouted)
    for key, ids in staged_index.items():
        b.index[key] = b.index.get(key, frozenset()) | ids
    for row in rows:
        b.logged[row.id] = row.referral_id
    released = _release(b, [k for k, _ in keys], mid)
    b.updates[mid] = MessageUpdate(mid, "processed", diagnostics, r.mapping_id, rule)
    b.reports[mid] = Report(
        mid,
        "processed",
        new_events=tuple(row.type.value for row in rows),
        known_events=known_count,
        referrals=tuple(dict.fromkeys(referrals)),
        created=tuple(created),
        anomalies=tuple(anomalies),
        methods=tuple(methods),
        unparked=tuple(released),
        diagnostics=(*r.diagnostics, *unrouted),
        mapping_id=r.mapping_id,
    )
    return bool(released)


def trigger_for(row: EventRow, logged: LoggedEvent, projection: Referral, source: str) -> Trigger:
    """What routing sees of an applied event: the event, the referral right after it,
    the referral's origin and the listener ``source`` this event's message came on."""
    return Trigger(
        event=TriggerEvent(
            id=row.id,
            type=row.type,
            fields=logged.fields,
            occurred_at=row.occurred_at,
            sequence=row.sequence,
            state_before=row.state_before,
            state_after=row.state_after,
            message_id=row.message_id,
        ),
        referral=view_of(projection),
        source=str(projection.data.get("referral", {}).get("source") or ""),
        message_source=source,
    )


def _held(needs_auth: NeedsAuth | None, referral: Referral | None) -> str | None:
    if needs_auth is None or referral is None:
        return None
    return needs_auth(referral)


def _tried_after_decline(referral: Referral) -> list[str]:
    """The directory ids that have declined, with the one the packet went to last."""
    data = referral.data.get("referral", {})
    listed = data.get(TRIED_FIELD)
    tried = [str(x) for x in listed] if isinstance(listed, list) else []
    last = data.get("delivery.recipient")
    if isinstance(last, str) and last and last not in tried:
        tried.append(last)
    return tried


def view_of(r: Referral) -> ReferralView:
    return ReferralView(r.id, r.state, r.created_at, r.updated_at, r.data)


def delivery_row(referral_id: str, event_id: str, d: DeliveryRequest) -> NewDelivery:
    """The outbox row for a delivery routing decided on."""
    return NewDelivery(
        key=d.key,
        referral_id=referral_id,
        event_id=event_id,
        route_id=d.route_id,
        kind=d.kind,
        channel=d.channel,
        format=d.format,
        endpoint=d.endpoint,
        recipient_id=d.recipient_id,
        receiver_application=d.receiver.application,
        receiver_facility=d.receiver.facility,
    )


def _release(b: _Batch, new_keys: Sequence[Key], by: int) -> list[int]:
    """Parked messages (in this batch or before it) that a newly indexed key releases."""
    if not new_keys:
        return []
    released: list[int] = []
    for mid in sorted(b.parked_here):
        update = b.updates[mid]
        if any(_releases(w, k) for w in update.keys for k in new_keys):
            b.parked_here.discard(mid)
            b.updates[mid] = MessageUpdate(
                mid, "received", update.diagnostics, update.mapping_id, update.rule_id, True
            )
            old = b.reports[mid]
            b.reports[mid] = Report(
                mid, "received", known_events=old.known_events, mapping_id=old.mapping_id
            )
            released.append(mid)
    outside = sorted(
        {mid for mid, w in b.parked_outside if any(_releases(w, k) for k in new_keys)} - {by}
    )
    for mid in outside:
        if mid not in b.unpark and mid not in b.updates:
            b.unpark.append(mid)
            released.append(mid)
    return sorted(released)


class _Overlay(Mapping[Key, frozenset[str]]):
    """The batch's index with this message's staged keys on top, without copying it."""

    def __init__(
        self, base: Mapping[Key, frozenset[str]], staged: Mapping[Key, frozenset[str]]
    ) -> None:
        self._base, self._staged = base, staged

    def __getitem__(self, key: Key) -> frozenset[str]:
        found = self._base.get(key, frozenset()) | self._staged.get(key, frozenset())
        if not found:
            raise KeyError(key)
        return found

    def __iter__(self) -> Iterator[Key]:
        yield from self._base
        yield from (k for k in self._staged if k not in self._base)

    def __len__(self) -> int:
        return len(self._base) + sum(1 for k in self._staged if k not in self._base)


def _why_parked(ev: CanonicalEvent, method: str, candidates: Sequence[str]) -> str:
    kinds = sorted({k.kind.value for k in keys_of(ev)})
    offered = ", ".join(kinds) if kinds else "no correlation keys"
    if method == "conflict":
        return (
            f"{ev.type.value}: its keys ({offered}) name {len(candidates)} referrals; "
            "parked for review"
        )
    return f"{ev.type.value}: no referral matches its keys ({offered}) yet; parked until one does"
