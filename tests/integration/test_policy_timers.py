"""Policy timers through the real writers and the real scheduler, in virtual time.

The shipped policy (mappings/policies/default.yaml) on SQLite and PostgreSQL: the
normaliser and events recorded by hand arm and clear timers in their transactions, the
scheduler fires each at its threshold and not before, once, across restarts and across
two engines sharing one PostgreSQL.
"""

from __future__ import annotations

import multiprocessing
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from engine.domain.referral import Event, State
from engine.outbound.routing import EMPTY
from engine.policy.language import load_policy
from engine.services.normaliser import Processor, Source
from engine.services.policy_runtime import NewEvent, record
from engine.services.scheduler import Scheduler
from engine.store.eventlog import LogConnection
from engine.store.schema import referral_events, referral_timers, referrals, worklist_items
from tests.helpers import MAPPINGS
from tests.loop_messages import orm, siu
from tests.normalising import drain, open_, shipped, store

POLICY = load_policy(MAPPINGS)
CREATED = datetime(2026, 11, 20, 16, 12, tzinfo=UTC)  # the order's ORC-9
SENT = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


@pytest.fixture
def engine(upgraded_url):
    eng = open_(upgraded_url)
    yield eng
    eng.dispose()


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def normalise(engine: Engine, payloads: list[bytes], at: datetime) -> None:
    store(engine, payloads, at=at)
    proc = Processor(engine, shipped, {"test": Source()}, clock=Clock(at), policy=lambda: POLICY)
    drain(proc)
    proc.close()


def referral_id(engine: Engine, placer: str) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                select(referrals.c.id).where(referrals.c.placer_order_number == placer)
            ).scalar_one()
        )


def send(engine: Engine, rid: str, at: datetime) -> None:
    """The packet went (as the dispatcher records it): the scheduling clock starts."""
    log = LogConnection(engine)
    try:
        record(
            log,
            rid,
            [NewEvent(str(uuid.uuid5(uuid.NAMESPACE_URL, rid)), Event.REFERRAL_SENT, {}, at)],
            at,
            policy=POLICY,
        )
    finally:
        log.close()


def scheduler(engine: Engine) -> Scheduler:
    return Scheduler(engine, policy=lambda: POLICY, outbound=lambda: EMPTY)


def pending(engine: Engine, rid: str) -> list[tuple[str, str, datetime]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(referral_timers.c.rule, referral_timers.c.kind, referral_timers.c.due_at)
            .where(referral_timers.c.referral_id == rid, referral_timers.c.status == "pending")
            .order_by(referral_timers.c.due_at, referral_timers.c.rule)
        )
        return [(r.rule, r.kind, r.due_at) for r in rows]


def events(engine: Engine, rid: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(referral_events.c.type)
            .where(referral_events.c.referral_id == rid)
            .order_by(referral_events.c.sequence)
        )
        return [t for (t,) in rows]


def items(engine: Engine, rid: str) -> list[tuple[str, str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(worklist_items.c.reason, worklist_items.c.status, worklist_items.c.resolved_by)
            .where(worklist_items.c.referral_id == rid)
            .order_by(worklist_items.c.id)
        )
        return [(r.reason, r.status, r.resolved_by) for r in rows]


def test_a_referral_that_is_never_scheduled_climbs_the_ladder_on_time(engine):
    normalise(engine, [orm("T1-O", "PT1")], CREATED + timedelta(minutes=5))
    rid = referral_id(engine, "PT1")
    # Created and not yet sent: the 1-day "never left" window runs.
    assert pending(engine, rid) == [("unsent", "window", CREATED + timedelta(days=1))]

    send(engine, rid, SENT)
    assert pending(engine, rid) == [
        ("schedule_reminders", "outreach", SENT + timedelta(hours=2)),
        ("unscheduled", "window", SENT + timedelta(days=14)),
    ]

    sched = scheduler(engine)
    try:
        assert sched.tick(SENT + timedelta(hours=2) - SECOND).timers == 0
        fired = sched.tick(SENT + timedelta(hours=2))
        assert (fired.timers, fired.effects) == (1, ("outreach",))
        # No outreach planner configured here: the reminder is recorded as skipped.
        assert events(engine, rid)[-1] == Event.OUTREACH_SKIPPED.value
        assert pending(engine, rid)[0] == (
            "schedule_reminders",
            "outreach",
            SENT + timedelta(hours=24),
        )

        # A late scheduler (an outage) catches up in order, each step once.
        fired = sched.tick(SENT + timedelta(days=14, hours=1))
        assert sorted(fired.effects) == [
            "escalate",
            "outreach",
            "outreach",
            "outreach",
            "worklist",
        ]
        assert items(engine, rid) == [("not_scheduled_in_14d", "open", None)]
        assert events(engine, rid).count(Event.REFERRAL_ESCALATED.value) == 1
        assert pending(engine, rid) == [
            ("schedule_reminders", "escalate", SENT + timedelta(days=21)),
        ]
        assert sched.tick(SENT + timedelta(days=14, hours=2)).timers == 0
    finally:
        sched.close()

    # Booked on day 15: the ladder is cleared, the stalled item resolves itself.
    normalise(engine, [siu("T1-S12", "PT1")], SENT + timedelta(days=15))
    with engine.connect() as conn:
        state = conn.execute(select(referrals.c.state).where(referrals.c.id == rid)).scalar_one()
    assert state == State.SCHEDULED.value
    assert all(rule != "schedule_reminders" for rule, _, _ in pending(engine, rid))
    assert items(engine, rid) == [("not_scheduled_in_14d", "resolved", "refloop")]
    sched = scheduler(engine)
    try:
        assert "escalate" not in sched.tick(SENT + timedelta(days=30)).effects
    finally:
        sched.close()


def test_timers_survive_a_restart_and_fire_once(engine):
    normalise(engine, [orm("T2-O", "PT2")], CREATED)
    rid = referral_id(engine, "PT2")
    send(engine, rid, SENT)
    first = scheduler(engine)
    assert first.tick(SENT + timedelta(days=3)).timers == 2  # the 2-hour and 1-day steps
    first.close()
    engine.dispose()  # the process is gone: a new engine, a new scheduler

    again = scheduler(engine)
    try:
        assert again.tick(SENT + timedelta(days=3)).timers == 0  # already fired
        assert again.tick(SENT + timedelta(days=7)).timers == 1  # the next step, once
        assert again.tick(SENT + timedelta(days=7)).timers == 0
    finally:
        again.close()
    assert events(engine, rid).count(Event.OUTREACH_SKIPPED.value) == 3


def tick_until_done(url: str, at: str, start: Any, results: Any) -> None:
    """One engine process: its own connection pool and scheduler, ticking until nothing
    is due (the other process may hold the turn meanwhile); puts how many it fired."""
    engine = open_(url)
    scheduler = Scheduler(engine, policy=lambda: POLICY, outbound=lambda: EMPTY, batch=3)
    now = datetime.fromisoformat(at)
    total = 0
    try:
        start.wait(timeout=30)
        for _ in range(500):
            total += scheduler.tick(now).timers
            if scheduler.due(now) == 0:
                break
    finally:
        scheduler.close()
        engine.dispose()
    results.put(total)


def test_two_engine_processes_on_one_postgres_never_fire_the_same_timer_twice(pg_upgraded):
    engine_a, engine_b = open_(pg_upgraded), open_(pg_upgraded)
    try:
        placers = [f"PG{i}" for i in range(12)]
        normalise(
            engine_a, [orm(f"{p}-O", p, mrn=f"9{i:05d}") for i, p in enumerate(placers)], CREATED
        )
        for p in placers:
            send(engine_a, referral_id(engine_a, p), SENT)
        with engine_a.connect() as conn:
            due = conn.execute(
                select(func.count())
                .select_from(referral_timers)
                .where(
                    referral_timers.c.status == "pending",
                    referral_timers.c.due_at <= SENT + timedelta(days=14),
                )
            ).scalar_one()
        assert due == 2 * len(placers)  # the 2-hour text and the 14-day window each
        # Two engine processes (spawned: nothing shared but the database) tick at once.
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(2)
        results = ctx.Queue()
        at = (SENT + timedelta(days=14)).isoformat()
        workers = [
            ctx.Process(target=tick_until_done, args=(pg_upgraded, at, start, results))
            for _ in range(2)
        ]
        for w in workers:
            w.start()
        fired = [results.get(timeout=90) for _ in workers]
        for w in workers:
            w.join(timeout=30)
        assert [w.exitcode for w in workers] == [0, 0]
        # Each due timer fired exactly once between them (each ladder step arms the next:
        # the 2-hour, 1-day, 7-day and 14-day steps and the window, per referral).
        with engine_a.connect() as conn:
            escalations = conn.execute(
                select(referral_events.c.referral_id, func.count())
                .where(referral_events.c.type == Event.REFERRAL_ESCALATED.value)
                .group_by(referral_events.c.referral_id)
            ).all()
        assert sum(fired) == 5 * len(placers)
        assert sorted(n for _, n in escalations) == [1] * len(placers)
    finally:
        engine_a.dispose()
        engine_b.dispose()


def add(engine: Engine, rid: str, kind: Event, at: datetime, **fields: object) -> None:
    log = LogConnection(engine)
    try:
        eid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{rid}/{kind}/{at.isoformat()}"))
        record(log, rid, [NewEvent(eid, kind, fields, at)], at, policy=POLICY)
    finally:
        log.close()


def test_events_that_are_exceptions_raise_worklist_items_and_resolve_when_moot(engine):
    normalise(engine, [orm("T3-O", "PT3")], CREATED)
    rid = referral_id(engine, "PT3")
    send(engine, rid, SENT)
    add(
        engine,
        rid,
        Event.DELIVERY_FAILED,
        SENT + timedelta(hours=1),
        **{"delivery.kind": "writeback", "delivery.channel": "ehr", "delivery.error": "HTTP 400"},
    )
    add(engine, rid, Event.APPOINTMENT_BOOKED, SENT + timedelta(days=2), appointment_id="A1")
    add(engine, rid, Event.APPOINTMENT_NO_SHOW, SENT + timedelta(days=9))
    assert items(engine, rid) == [
        ("delivery_dead_lettered", "open", None),
        ("no_show", "open", None),
    ]
    with engine.connect() as conn:
        detail = conn.execute(
            select(worklist_items.c.detail).where(
                worklist_items.c.reason == "delivery_dead_lettered"
            )
        ).scalar_one()
    assert detail == "writeback on channel ehr dead-lettered: HTTP 400"
    # The no-show ladder starts at once (re-engagement, a notice to the referrer).
    assert "no_show_reengagement" in {r for r, _, _ in pending(engine, rid)}

    # Rebooked: the no-show is no longer an exception; a dead letter stays until handled.
    add(engine, rid, Event.APPOINTMENT_BOOKED, SENT + timedelta(days=10), appointment_id="A2")
    assert items(engine, rid) == [
        ("delivery_dead_lettered", "open", None),
        ("no_show", "resolved", "refloop"),
    ]
    assert "no_show_reengagement" not in {r for r, _, _ in pending(engine, rid)}
    # Recording the same event again (a retry) raises nothing twice.
    add(engine, rid, Event.APPOINTMENT_NO_SHOW, SENT + timedelta(days=9))
    assert len(items(engine, rid)) == 2


def test_the_scheduler_sets_worklist_and_kpi_gauges_from_the_store(engine):
    from engine.metrics import Metrics
    from tests.loop_messages import loop

    metrics = Metrics()
    normalise(engine, loop("PT4"), CREATED)  # closed by its consult note
    normalise(engine, [orm("T5-O", "PT5", mrn="200002")], CREATED)  # never sent
    sched = Scheduler(engine, policy=lambda: POLICY, outbound=lambda: EMPTY, metrics=metrics)
    try:
        sched.tick(CREATED + timedelta(days=2))  # PT5's "unsent" window is missed
        sched.refresh_gauges(CREATED + timedelta(days=2))
        sched.refresh_kpis(CREATED + timedelta(days=40))
    finally:
        sched.close()

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("refloop_worklist_open", reason="referral_not_sent") == 1
    assert sample("refloop_escalations_total", kind="escalate") == 1
    assert sample("refloop_timers_due") == 0
    assert sample("refloop_loop_closure_ratio") == 0.5
    assert sample("refloop_open_referrals_30d_ratio") == 0.5
    assert sample("refloop_days_to_close", quantile="0.5") is not None


def test_booking_cancels_a_reminder_still_waiting_in_the_outbox(engine):
    from engine.config import OutreachConfig
    from engine.outbound.packets.outreach import Templates
    from engine.policy.outreach import OutreachSettings
    from engine.services.outreach_runtime import planner
    from engine.store.schema import deliveries

    normalise(engine, [orm("T6-O", "PT6")], CREATED)
    rid = referral_id(engine, "PT6")
    # A French-speaking patient with a mobile and SMS consent; no French templates ship.
    contact = {
        "patient.phone": "+15550100177",
        "patient.consent.sms": "yes",
        "patient.language": "fr",
        "patient.timezone": "UTC",
    }
    add(engine, rid, Event.REFERRAL_UPDATED, SENT - timedelta(hours=1), **contact)
    send(engine, rid, SENT)
    settings = OutreachSettings.of(OutreachConfig(quiet_start="23:00", quiet_end="23:01"), ["sms"])
    sched = Scheduler(
        engine,
        policy=lambda: POLICY,
        outbound=lambda: EMPTY,
        outreach=planner(settings, Templates.load(MAPPINGS / "policies" / "templates")),
    )
    try:
        fired = sched.tick(SENT + timedelta(days=3))  # 15:00 UTC: not quiet
    finally:
        sched.close()
    assert fired.effects == ("outreach", "outreach")  # the 2-hour text, the 1-day one

    def outbox() -> list[tuple[str, str]]:
        with engine.connect() as conn:
            return [
                (r.kind, r.status)
                for r in conn.execute(select(deliveries.c.kind, deliveries.c.status))
            ]

    assert outbox() == [("outreach", "pending")] * 2  # no dispatcher ran: they wait
    assert ("template_language_fallback", "open", None) in items(engine, rid)
    # Booked before the reminder went: it is cancelled in the booking's transaction.
    normalise(engine, [siu("T6-S12", "PT6")], SENT + timedelta(days=3, hours=1))
    assert outbox() == [("outreach", "cancelled")] * 2
