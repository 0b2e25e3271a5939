"""One simulated run: the real engine, in virtual time, against the synthetic network.

Theory of operation
-------------------
A run owns a fresh SQLite file (migrated by the real Alembic migrations, once per
process, then copied) and drives the engine's own services on it, each with the virtual
clock: messages are committed by the ingest store exactly as a listener's writer does,
normalised by :class:`~engine.services.normaliser.Processor`, due timers fired by
:class:`~engine.services.scheduler.Scheduler`, and the outbox drained through the
dispatcher's :class:`~engine.services.dispatcher.DispatchStore` (claim, then record the
outcome: the same transactions, events and policy pass as in the daemon). Only the
channels are scripted: instead of sending, the run records each delivery as delivered
and lets the peer on the other end react (:meth:`Run._delivered`), nothing is rendered.

Peers react by scheduling *actions* — the patient books, cancels, comes or not, the
specialist sends the note, the patient replies to a reminder — which become inbound
HL7 messages (or, for a reply, a ``patient.replied`` event through
:func:`~engine.services.policy_runtime.record`) when their time comes:

* a packet delivered → the specialist has the referral; the patient books after their
  own delay, or never (:class:`~engine.sim.network.Behaviour`);
* an outreach delivered → a chance to book within a couple of days (and to reply);
  before a booked visit, a smaller chance of not coming;
* a notice to the referrer (escalation, no-show) → a smaller, slower chance to book;
* a note request to the specialist → a chance the note comes back within days.

Time moves by jumps, not ticks: to the next scripted action or the next due timer,
whichever is first, rounded up to ``resolution`` (an hour by default), so everything
due within the same hour shares its transactions. At each moment: commit the due
messages, normalise them, then alternate outbox and scheduler until neither has work.
"""

from __future__ import annotations

import heapq
import random
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, select

from channels.base import Receipt
from engine.domain.kpis import Kpis
from engine.domain.projection import Referral
from engine.domain.referral import Event
from engine.mapping.mapset import MappingSet
from engine.outbound.directory import Directory
from engine.outbound.model import Party, Target
from engine.outbound.model import Specialist as DirectoryEntry
from engine.outbound.routing import Outbound, WritebackTarget
from engine.policy.language import Policy
from engine.policy.timers import Effect
from engine.services.dispatcher import DispatchStore, Outcome
from engine.services.intake import Policy as IntakePolicy
from engine.services.intake import ack_for, assess, record
from engine.services.mappings import router_of
from engine.services.normaliser import Processor, Source
from engine.services.policy_runtime import NewEvent
from engine.services.policy_runtime import record as record_events
from engine.services.scheduler import OutreachDecision, OutreachPlanner, Scheduler
from engine.sim import messages
from engine.sim.network import Network, Order, lognormal_days
from engine.store.database import open_engine, upgrade
from engine.store.eventlog import EventLog, LogConnection
from engine.store.ingest import IngestStore
from engine.store.kpis import store_kpis
from engine.store.outbox import NewDelivery
from engine.store.schema import referrals

__all__ = ["CHANNELS", "LISTENER", "Run", "outbound_for", "run"]

#: The listener (and so the write-back source) every simulated message arrives on.
LISTENER = "sim"
SPECIALIST_CHANNEL = "sim-specialist"
EHR_CHANNEL = "sim-ehr"
#: Every channel a simulated delivery can go out on.
CHANNELS = (SPECIALIST_CHANNEL, EHR_CHANNEL, "sms", "email")
_NS = uuid.UUID("a3c9e0b2-7f41-4d65-8b1e-2f6d9c4a5e13")
_WORKER = "refloop-simulate"
_TEMPLATE_LOCK = threading.Lock()
_TEMPLATE: dict[str, Path] = {}


def outbound_for(network: Network, shipped: Outbound) -> Outbound:
    """The shipped routes with the network's specialists as the directory and a write-back
    for the simulated source (the referrer's EHR is a scripted peer too)."""
    directory = Directory(
        tuple(
            DirectoryEntry(
                id=s.id,
                name=s.name,
                targets=(Target(SPECIALIST_CHANNEL, "hl7v2.ref_i12", f"sim:{s.id}"),),
                npi=s.npi,
                specialties=(s.specialty,),
                receiver=Party(application="SIMSPEC", facility=s.id.upper()),
            )
            for s in network.specialists
        )
    )
    writeback = {
        LISTENER: WritebackTarget(
            source=LISTENER,
            channel=EHR_CHANNEL,
            status_format="hl7v2.orm_status",
            note_format="hl7v2.oru_note",
            receiver=Party(application="SIM_EHR", facility="SIMCLINIC"),
        )
    }
    return replace(shipped, directory=directory, writeback=writeback)


def _template_db() -> Path:
    """A migrated, empty database, made once per process (migrating costs more than a run
    of a few referrals); every run copies it."""
    with _TEMPLATE_LOCK:
        if "path" not in _TEMPLATE:
            folder = Path(tempfile.mkdtemp(prefix="refloop-sim-template-"))
            path = folder / "template.db"
            engine = open_engine(f"sqlite:///{path}")
            try:
                upgrade(engine)
            finally:
                engine.dispose()
            _TEMPLATE["path"] = path
        return _TEMPLATE["path"]


@dataclass(order=True)
class _Action:
    at: datetime
    n: int
    kind: str = field(compare=False)  # order | book | cancel | visit | note | reply
    index: int = field(compare=False)
    token: int = field(compare=False, default=0)


@dataclass
class _Case:
    """One referral as the peers see it: where it stands and what is scheduled."""

    order: Order
    base: random.Random  # what happens unprompted
    nudge: random.Random  # answers to reminders
    phase: str = "ordered"  # ordered | waiting | booked | visited | noted
    booking: datetime | None = None  # when the patient will book, if they will
    book_token: int = 0
    note: datetime | None = None  # when the note will come, if it will
    note_token: int = 0
    appointments: int = 0
    start: datetime | None = None
    reminded: bool = False  # an outreach reached them while booked
    messages: int = 0
    replies: int = 0
    referral_id: str = ""


class Run:
    """One run of ``network`` under ``policy`` (see the module docstring)."""

    def __init__(
        self,
        network: Network,
        mapping_set: MappingSet,
        outbound: Outbound,
        policy: Policy,
        folder: Path,
        *,
        resolution: timedelta = timedelta(hours=1),
        outreach: OutreachPlanner | None = None,
    ) -> None:
        self.network = network
        self.policy = policy
        self.outbound = outbound
        self.resolution = resolution
        self.now = network.start
        path = folder / "sim.db"
        shutil.copyfile(_template_db(), path)
        # A scratch file: a crash loses nothing anyone keeps, so no fsync per commit.
        self.engine: Engine = open_engine(f"sqlite:///{path}", sqlite_synchronous="OFF")
        route = router_of(outbound, CHANNELS)
        self.processor = Processor(
            self.engine,
            lambda: mapping_set,
            {LISTENER: Source()},
            clock=self._clock,
            router=lambda: route,
            policy=lambda: policy,
        )
        self.dispatch = DispatchStore(self.engine, policy=lambda: policy)
        self.scheduler = Scheduler(
            self.engine,
            policy=lambda: policy,
            outbound=lambda: outbound,
            outreach=self._outreach if outreach is None else outreach,
            clock=self._clock,
        )
        self.replies = LogConnection(self.engine)
        self._raw = self.engine.raw_connection()
        self._ingest = IngestStore(self._raw.driver_connection, "sqlite", lambda *_: None)
        self._intake = IntakePolicy()
        self._queue: list[_Action] = []
        self._n = 0
        self._acks = 0
        self.cases: dict[int, _Case] = {}
        self._by_placer: dict[str, _Case] = {}
        self._by_referral: dict[str, _Case] = {}
        for o in network.orders:
            base, nudge = network.rng(o.index)
            case = _Case(o, base, nudge)
            self.cases[o.index] = case
            self._by_placer[o.placer] = case
            self._push(o.at, "order", o.index)

    def _clock(self) -> datetime:
        return self.now

    def close(self) -> None:
        self.processor.close()
        self.dispatch.close()
        self.scheduler.close()
        self.replies.close()
        self._raw.close()
        self.engine.dispose()

    # -- time --------------------------------------------------------------------------

    def _grid(self, at: datetime) -> datetime:
        """``at`` rounded up to the resolution grid (from the network's start)."""
        step = self.resolution.total_seconds()
        offset = (at - self.network.start).total_seconds()
        ticks = -(-offset // step)
        return self.network.start + timedelta(seconds=ticks * step)

    def _push(self, at: datetime, kind: str, index: int, token: int = 0) -> None:
        self._n += 1
        heapq.heappush(self._queue, _Action(at, self._n, kind, index, token))

    def _later(self, at: datetime) -> datetime:
        """A reaction happens after what caused it: at least one step later."""
        return max(at, self.now + self.resolution)

    def _next_timer(self) -> datetime | None:
        el = self.replies.eventlog
        try:
            return el.timers.next_due()
        finally:
            el.end()

    def run(self) -> Kpis:
        end = self.network.end
        last: datetime | None = None
        while True:
            candidates = [end]
            if self._queue:
                candidates.append(self._grid(self._queue[0].at))
            due = self._next_timer()
            if due is not None:
                candidates.append(self._grid(due))
            target = max(min(candidates), self.now)
            if last is not None and target <= last:
                # Something stayed due through a whole moment (a timer the scheduler
                # could not fire): move on rather than spin.
                target = last + self.resolution
            self.now = min(target, end)
            self._moment()
            last = self.now
            if self.now >= end:
                break
        return store_kpis(self.engine, end)

    def _moment(self) -> None:
        payloads: list[bytes] = []
        replies: list[_Case] = []
        while self._queue and self._queue[0].at <= self.now:
            action = heapq.heappop(self._queue)
            case = self.cases[action.index]
            if action.kind == "reply":
                replies.append(case)
            else:
                payloads += self._act(case, action)
        if payloads:
            self._store(payloads)
            while batch := self.processor.next_batch(256):
                self.processor.process(batch, wait=True)
        for case in replies:
            self._reply(case)
        for _ in range(20):  # a fixed point within a few rounds; the bound is a guard
            delivered = self._drain()
            fired = self.scheduler.tick(self.now)
            if not delivered and not fired.timers:
                break

    # -- the engine's side -------------------------------------------------------------

    def _store(self, payloads: Sequence[bytes]) -> None:
        rows = []
        for payload in payloads:
            intake = assess(payload, self._intake)
            self._acks += 1
            answer = ack_for(
                intake, self._intake.ack_mode, control_id=f"SIMACK{self._acks}", now=self.now
            )
            rows.append(
                record(
                    intake,
                    payload=payload,
                    listener=LISTENER,
                    peer="simulated",
                    received_at=self.now,
                    answer=answer,
                )
            )
        self._ingest.write(rows, [self._intake.duplicate_window] * len(rows))

    def _drain(self) -> int:
        done = 0
        while claimed := self.dispatch.claim(self.now, _WORKER, {c: 500 for c in CHANNELS}):
            for d in claimed:
                receipt = Receipt(peer_reference=f"sim-{d.id}", detail="simulated", confirmed=True)
                self.dispatch.record(d, Outcome("delivered", receipt), self.now)
                case = self._case_of(d.referral_id)
                if case is not None:
                    self._delivered(case, d.kind, d.route_id)
                done += 1
        return done

    def _case_of(self, referral_id: str) -> _Case | None:
        if referral_id not in self._by_referral:
            with self.engine.connect() as conn:
                placer = conn.execute(
                    select(referrals.c.placer_order_number).where(referrals.c.id == referral_id)
                ).scalar()
            case = self._by_placer.get(str(placer))
            if case is None:
                return None
            case.referral_id = referral_id
            self._by_referral[referral_id] = case
        return self._by_referral[referral_id]

    def _outreach(
        self, el: EventLog, effect: Effect, referral: Referral, event_id: str, now: datetime
    ) -> OutreachDecision:
        """The simulator's outreach planner: the first preferred channel the patient has
        consented to and has an address for (no voice gateway here), never deferred."""
        placer = referral.placer_order
        case = self._by_placer.get(placer[0]) if placer else None
        if case is None:
            return OutreachDecision(reason="no_contact")
        o = case.order
        usable = {"sms": o.sms_consent, "email": o.email_consent}
        channel = next((c for c in (*effect.prefer, "sms", "email") if usable.get(c)), "")
        if not channel:
            return OutreachDecision(reason="no_consent")
        delivery = NewDelivery(
            key=str(uuid.uuid5(_NS, f"{event_id}/{channel}")),
            referral_id=referral.id,
            event_id=event_id,
            route_id=f"policy:{effect.rule}",
            kind="outreach",
            channel=channel,
            format=f"outreach.{channel}",
        )
        fields = {"outreach.channel": channel, "outreach.language": o.patient.language}
        return OutreachDecision(delivery=delivery, channel=channel, fields=fields)

    def _reply(self, case: _Case) -> None:
        case.replies += 1
        event = NewEvent(
            id=str(uuid.uuid5(_NS, f"{case.order.placer}/reply/{case.replies}")),
            type=Event.PATIENT_REPLIED,
            fields={"reply.channel": "sms", "reply.keyword": "CALL"},
            occurred_at=self.now,
            method="reply",
        )
        record_events(self.replies, case.referral_id, [event], self.now, policy=self.policy)

    # -- the peers ---------------------------------------------------------------------

    def _delivered(self, case: _Case, kind: str, route: str) -> None:
        b = self.network.behaviour
        if kind == "packet" and case.phase == "ordered":
            case.phase = "waiting"
            never = case.base.random() < b.never_book
            delay = lognormal_days(case.base, b.booking_days, b.booking_spread)
            if not never:
                self._book_at(case, self.now + delay)
        elif kind == "outreach" and case.phase == "booked":
            case.reminded = True
        elif kind == "outreach" and case.phase == "waiting":
            if case.nudge.random() < b.outreach_response:
                self._book_at(case, self.now + case.nudge.uniform(0, b.nudge_days) * _DAY)
            if case.nudge.random() < b.reply:
                at = self._later(self.now + case.nudge.uniform(0, 1) * _DAY)
                self._push(at, "reply", case.order.index)
        elif (
            route in ("escalation_to_referrer", "no_show_notice")
            and case.phase == "waiting"
            and case.nudge.random() < b.referrer_response
        ):
            self._book_at(case, self.now + case.nudge.uniform(0, b.referrer_days) * _DAY)
        elif (
            route == "note_request"
            and case.phase == "visited"
            and case.nudge.random() < b.note_request_response
        ):
            self._note_at(case, self.now + case.nudge.uniform(0, b.note_request_days) * _DAY)

    def _book_at(self, case: _Case, at: datetime) -> None:
        at = self._later(at)
        if case.booking is not None and case.booking <= at:
            return  # they were going to book sooner anyway
        case.booking = at
        case.book_token += 1
        self._push(at, "book", case.order.index, case.book_token)

    def _note_at(self, case: _Case, at: datetime) -> None:
        at = self._later(at)
        if case.note is not None and case.note <= at:
            return
        case.note = at
        case.note_token += 1
        self._push(at, "note", case.order.index, case.note_token)

    def _control(self, case: _Case) -> str:
        case.messages += 1
        return f"{case.order.placer}-{case.messages}"

    def _act(self, case: _Case, action: _Action) -> list[bytes]:
        """The messages an action sends now (and the actions it schedules)."""
        b = self.network.behaviour
        o = case.order
        p = o.patient
        now = self.now
        if action.kind == "order":
            return [
                messages.order(
                    self._control(case),
                    o.placer,
                    p,
                    o.specialist.service,
                    o.priority,
                    now,
                    sms_consent=o.sms_consent,
                    email_consent=o.email_consent,
                )
            ]
        if action.kind == "book":
            if action.token != case.book_token or case.phase != "waiting":
                return []
            case.booking = None
            case.phase = "booked"
            case.reminded = False
            case.appointments += 1
            lead = lognormal_days(case.base, o.specialist.lead_days, b.lead_spread)
            visit = self._grid(now + max(lead, timedelta(hours=2)))
            case.start = visit
            if case.base.random() < b.cancel:
                self._push(now + (visit - now) * case.base.random(), "cancel", o.index)
            else:
                self._push(visit, "visit", o.index)
            appt = f"{o.placer}-A{case.appointments}"
            return [messages.booked(self._control(case), o.placer, p, appt, visit, now)]
        appt = f"{o.placer}-A{case.appointments}"
        start = case.start
        if action.kind == "cancel":
            assert start is not None
            self._waiting_again(case)
            return [messages.cancelled(self._control(case), o.placer, p, appt, start, now)]
        if action.kind == "visit":
            assert start is not None
            if case.base.random() < (b.reminded_no_show if case.reminded else b.no_show):
                self._waiting_again(case)
                return [messages.no_show(self._control(case), o.placer, p, appt, start, now)]
            case.phase = "visited"
            never = case.base.random() < o.specialist.note_never
            delay = lognormal_days(case.base, b.note_days, b.note_spread)
            if not never:
                self._note_at(case, now + delay)
            return [messages.completed(self._control(case), o.placer, p, appt, start, now)]
        if action.kind == "note":
            if action.token != case.note_token or case.phase != "visited":
                return []
            case.phase = "noted"
            case.note = None
            return [messages.consult_note(self._control(case), o.placer, p, now)]
        raise ValueError(f"unknown simulator action {action.kind}")

    def _waiting_again(self, case: _Case) -> None:
        """After a no-show or a cancellation: rebook unprompted, or wait for a nudge."""
        b = self.network.behaviour
        case.phase = "waiting"
        case.start = None
        rebook = case.base.random() < b.rebook
        delay = lognormal_days(case.base, b.rebook_days, 0.6)
        if rebook:
            self._book_at(case, self.now + delay)


_DAY = timedelta(days=1)


def run(
    network: Network,
    mapping_set: MappingSet,
    outbound: Outbound,
    policy: Policy,
    *,
    resolution: timedelta = timedelta(hours=1),
    on_run: Callable[[Run], None] | None = None,
    outreach: OutreachPlanner | None = None,
) -> Kpis:
    """One run in a temporary folder (removed afterwards); the KPIs at the network's end.
    ``outreach``: the engine's planner (consent from the orders' CON segments, quiet
    hours, templates); None: a simple one (first consented medium, never deferred)."""
    with tempfile.TemporaryDirectory(prefix="refloop-sim-") as folder:
        sim = Run(
            network,
            mapping_set,
            outbound,
            policy,
            Path(folder),
            resolution=resolution,
            outreach=outreach,
        )
        try:
            kpis = sim.run()
            if on_run is not None:
                on_run(sim)
            return kpis
        finally:
            sim.close()
