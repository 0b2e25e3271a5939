"""Appointment reminders end to end through the real scheduler, outbox and renderer.

The planner is the daemon's (engine.services.outreach_runtime): preferences from the
store, the contact from the projection, the pure plan, and a ``Send`` turned into an
outbox delivery whose trigger is the ``outreach.planned`` event the scheduler appends.
Virtual time throughout.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from engine.domain.referral import Event
from engine.outbound.model import Party
from engine.outbound.packets.outreach import Templates, render_sms
from engine.outbound.routing import EMPTY
from engine.policy.language import load_policy
from engine.policy.outreach import OutreachSettings
from engine.services.dispatcher import DispatchStore
from engine.services.normaliser import Processor, Source
from engine.services.outreach_runtime import planner
from engine.services.policy_runtime import NewEvent, record
from engine.services.scheduler import Scheduler
from engine.store.eventlog import LogConnection
from engine.store.schema import deliveries, referral_events, referral_timers, worklist_items
from tests.helpers import MAPPINGS
from tests.loop_messages import orm
from tests.normalising import drain, open_, shipped, store

POLICY = load_policy(MAPPINGS)
TEMPLATES_DIR = MAPPINGS / "policies" / "templates"
TEMPLATES = Templates.load(TEMPLATES_DIR)
T0 = datetime(2026, 11, 2, 14, 0, tzinfo=UTC)
_NS = uuid.UUID("8f1c2a6e-3d4b-4e5f-9a0b-1c2d3e4f5a6b")


@pytest.fixture
def engine(upgraded_url: str) -> Iterator[Engine]:
    eng = open_(upgraded_url)
    yield eng
    eng.dispose()


def referral(engine: Engine, placer: str, fields: dict[str, str]) -> str:
    store(engine, [orm(f"C-{placer}", placer)], at=T0)
    proc = Processor(engine, shipped, {"test": Source()}, clock=lambda: T0, policy=lambda: POLICY)
    drain(proc)
    proc.close()
    log = LogConnection(engine)
    try:
        el = log.eventlog
        (rid,) = [
            r.id for r in el.all_referrals() if r.placer_order and r.placer_order[0] == placer
        ]
        el.end()

        def ev(name: str, type_: Event, f: dict[str, str]) -> NewEvent:
            return NewEvent(str(uuid.uuid5(_NS, f"{rid}/{name}")), type_, f, T0)

        record(
            log,
            rid,
            [ev("contact", Event.REFERRAL_UPDATED, fields), ev("sent", Event.REFERRAL_SENT, {})],
            T0,
            policy=POLICY,
        )
    finally:
        log.close()
    return rid


def book(engine: Engine, rid: str, start: datetime, at: datetime, name: str = "book") -> None:
    log = LogConnection(engine)
    try:
        event = NewEvent(
            str(uuid.uuid5(_NS, f"{rid}/{name}")),
            Event.APPOINTMENT_BOOKED if name == "book" else Event.APPOINTMENT_RESCHEDULED,
            {"appointment_id": "A1", "start": start.isoformat()},
            at,
        )
        record(log, rid, [event], at, policy=POLICY)
    finally:
        log.close()


def pending_reminders(engine: Engine, rid: str) -> list[datetime]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(referral_timers.c.due_at)
            .where(
                referral_timers.c.referral_id == rid,
                referral_timers.c.rule == "appointment_reminders",
                referral_timers.c.status == "pending",
            )
            .order_by(referral_timers.c.due_at)
        )
        return [d if d.tzinfo else d.replace(tzinfo=UTC) for (d,) in rows]


def planned(engine: Engine, rid: str) -> list[dict[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(referral_events.c.fields)
            .where(
                referral_events.c.referral_id == rid,
                referral_events.c.type == Event.OUTREACH_PLANNED.value,
            )
            .order_by(referral_events.c.sequence)
        )
        return [json.loads(f) for (f,) in rows]


CONTACT = {
    "patient.phone": "(555) 555-0142",
    "patient.consent.sms": "yes",
    "patient.timezone": "America/New_York",
    "patient.language": "es",
}


def scheduler(engine: Engine, settings: OutreachSettings | None = None) -> Scheduler:
    return Scheduler(
        engine,
        policy=lambda: POLICY,
        outbound=lambda: EMPTY,
        outreach=planner(settings or OutreachSettings(), TEMPLATES),
    )


def test_reminders_72_and_24_hours_before_become_texts_in_spanish(engine: Engine) -> None:
    rid = referral(engine, "AR1", CONTACT)
    start = datetime(2026, 11, 12, 15, 30, tzinfo=UTC)  # 10:30 in New York (EST)
    book(engine, rid, start, T0 + timedelta(days=1))
    assert pending_reminders(engine, rid) == [start - timedelta(hours=72)]
    sched = scheduler(engine)
    try:
        assert sched.tick(start - timedelta(hours=72, seconds=1)).timers == 0
        assert sched.tick(start - timedelta(hours=72)).timers == 1
        assert pending_reminders(engine, rid) == [start - timedelta(hours=24)]
        assert sched.tick(start - timedelta(hours=24)).timers == 1
        assert pending_reminders(engine, rid) == []
    finally:
        sched.close()
    events = planned(engine, rid)
    assert [e["outreach.template"] for e in events] == ["appointment_reminder"] * 2
    assert {e["outreach.language"] for e in events} == {"es"}
    assert {e["outreach.channel"] for e in events} == {"sms"}
    assert all("555" not in json.dumps(e) for e in events)  # the number is the row's only
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(deliveries))]
    assert [(r["kind"], r["format"], r["channel"], r["endpoint"]) for r in rows] == [
        ("outreach", "outreach.sms", "sms", "+15555550142")
    ] * 2
    # The dispatcher's context for the row renders the Spanish reminder.
    ds = DispatchStore(engine)
    try:
        (claimed,) = ds.claim(start, "w1", {"sms": 1})
        ctx = ds.context(claimed, start, Party(), None, {"templates_dir": str(TEMPLATES_DIR)})
    finally:
        ds.close()
    text = render_sms(ctx).payload.decode()
    assert "jueves 12 de noviembre, 10:30 a. m." in text
    assert text.endswith("Responda ALTO para no recibir más mensajes.")


def test_quiet_hours_defer_and_a_reschedule_moves_the_reminders(engine: Engine) -> None:
    rid = referral(engine, "AR2", {**CONTACT, "patient.language": "vi"})
    first = datetime(2026, 11, 12, 11, 30, tzinfo=UTC)  # 06:30 in New York
    book(engine, rid, first, T0 + timedelta(days=1))
    sched = scheduler(engine)
    try:
        # 72 h before is 06:30 local: quiet, deferred to 08:00 EST (13:00 UTC).
        fired = sched.tick(first - timedelta(hours=72))
        assert (fired.timers, fired.deferred) == (0, 1)
        # (the next step is armed already: the scheduler arms it with the deferral)
        assert pending_reminders(engine, rid) == [
            datetime(2026, 11, 9, 13, 0, tzinfo=UTC),
            first - timedelta(hours=24),
        ]
        assert planned(engine, rid) == []
        # Rescheduled a week later before it went: the reminders follow the new start.
        later = first + timedelta(days=7, hours=6)  # 12:30 in New York
        book(engine, rid, later, datetime(2026, 11, 9, 12, 0, tzinfo=UTC), name="move")
        assert pending_reminders(engine, rid) == [later - timedelta(hours=72)]
        assert sched.tick(datetime(2026, 11, 9, 13, 0, tzinfo=UTC)).timers == 0
        assert sched.tick(later - timedelta(hours=72)).timers == 1
    finally:
        sched.close()
    (event,) = planned(engine, rid)
    assert event["outreach.language"] == "en"  # no Vietnamese template: the default
    with engine.connect() as conn:
        reasons = [r for (r,) in conn.execute(select(worklist_items.c.reason))]
    assert "template_language_fallback" in reasons


def test_no_consent_is_skipped_and_recorded(engine: Engine) -> None:
    rid = referral(engine, "AR3", {"patient.phone": "(555) 555-0142"})
    start = datetime(2026, 11, 12, 15, 30, tzinfo=UTC)
    book(engine, rid, start, T0 + timedelta(days=1))
    sched = scheduler(engine)
    try:
        assert sched.tick(start - timedelta(hours=72)).timers == 1
    finally:
        sched.close()
    with engine.connect() as conn:
        rows = conn.execute(
            select(referral_events.c.fields).where(
                referral_events.c.referral_id == rid,
                referral_events.c.type == Event.OUTREACH_SKIPPED.value,
            )
        )
        (skipped,) = [json.loads(f) for (f,) in rows]
        assert conn.execute(select(deliveries)).first() is None
    assert skipped["outreach.outcome"] == "no_consent"


def test_the_templates_dir_exists() -> None:
    assert Path(TEMPLATES_DIR).is_dir()
