"""The policy scheduler: due timers become escalations, worklist items, notices and outreach.

Theory of operation
-------------------
:meth:`Scheduler.tick` is one transaction holding the event log's writer turn (the
normaliser's lock: per-referral order holds against message batches) and, on
PostgreSQL, the scheduler's own advisory lock — a second engine's scheduler finds it
taken and does nothing this round. Inside it:

1. claim the timers due by ``now`` (earliest first; ``FOR UPDATE SKIP LOCKED``);
2. for each, ask the pure :func:`engine.policy.timers.on_due` what it does given the
   referral as it stands (a timer whose referral moved on is stale and does nothing);
3. turn its effects into changes: ``escalate`` → a ``referral.escalated`` event;
   ``worklist`` → an item; ``notify`` → a ``referral.escalated`` naming who is told and
   the deliveries of the route the step names (:meth:`Outbound.route_named`);
   ``outreach`` → the outreach planner's decision: an ``outreach.planned`` event and its
   delivery, a deferral past quiet hours (the timer stays pending, due later), or an
   ``outreach.skipped`` event;
4. mark the timers fired, arm the ladders' next steps, pass everything through
   :func:`~engine.services.policy_runtime.with_policy` (the events it appended may arm or
   clear timers and raise items of their own) and commit.

Every id is derived from the timer (effect keys, :func:`engine.policy.timers.effect_key`),
and the fired mark commits with the effects: a crash before the commit leaves the
timers pending and nothing done; after it, they are fired and done. Restarting loses
none and fires none twice; two engines on one PostgreSQL never fire the same timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import structlog
from sqlalchemy import Engine

from engine.domain.projection import LoggedEvent, Referral
from engine.domain.referral import Event
from engine.metrics import Metrics
from engine.outbound.routing import Outbound
from engine.policy.language import Policy
from engine.policy.timers import Effect, on_due
from engine.services.pipeline import delivery_row, trigger_for
from engine.services.policy_runtime import (
    NewEvent,
    append,
    item_key,
    merge,
    with_policy,
)
from engine.store.eventlog import Changes, EventLog, LogConnection
from engine.store.kpis import store_kpis
from engine.store.outbox import NewDelivery
from engine.store.worklist import ENGINE_ACTOR, NewItem

log = structlog.get_logger("refloop.scheduler")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OutreachDecision:
    """What the outreach planner made of an ``outreach`` effect.

    ``delivery`` set: send it (its trigger is an ``outreach.planned`` event with
    ``fields``). ``defer_until`` set: not now (quiet hours), try again then. Neither:
    skipped for ``reason`` (no consent, no contact, disabled …). ``notes`` are worklist
    reasons the coordinator should see (a template missing in the patient's language)."""

    delivery: NewDelivery | None = None
    defer_until: datetime | None = None
    reason: str = ""
    channel: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[tuple[str, str], ...] = ()  # (worklist reason, safe detail)


class OutreachPlanner(Protocol):
    def __call__(
        self, el: EventLog, effect: Effect, referral: Referral, event_id: str, now: datetime
    ) -> OutreachDecision: ...


@dataclass(frozen=True, slots=True)
class Fired:
    timers: int = 0
    effects: tuple[str, ...] = ()  # effect kinds, in order
    deferred: int = 0


class Scheduler:
    """Fires due policy timers; :meth:`tick` for tests and the simulator, :meth:`start`
    for the daemon (a loop in its own thread, woken by :meth:`wake_threadsafe`)."""

    def __init__(
        self,
        engine: Engine,
        *,
        policy: Callable[[], Policy],
        outbound: Callable[[], Outbound],
        outreach: OutreachPlanner | None = None,
        clock: Callable[[], datetime] | None = None,
        metrics: Metrics | None = None,
        batch: int = 200,
        poll_seconds: float = 5.0,
        on_commit: Callable[[], None] | None = None,
        kpi_seconds: float = 300.0,
    ) -> None:
        self.policy = policy
        self.outbound = outbound
        self.outreach = outreach
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.metrics = metrics
        self.batch = batch
        self.poll_seconds = poll_seconds
        self.on_commit = on_commit or (lambda: None)
        self._log = LogConnection(engine)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="refloop-scheduler")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self.kpi_seconds = kpi_seconds
        self._engine = engine
        self._next_kpis = 0.0
        self._extra: list[Callable[[], None]] = [self.refresh_gauges, self._kpis_due]
        self._reasons: set[str] = set()

    # -- the work ------------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> Fired:
        """Fire every timer due by ``now`` (batch by batch); how many fired."""
        now = now or self.clock()
        total = Fired()
        # A plain read first: most ticks find nothing due and need not take the writer's
        # turn from the normaliser.
        if self.due(now) == 0:
            if self.metrics is not None:
                self.metrics.timers_due.set(0)
            return total
        while True:
            fired = self._batch(now)
            total = Fired(
                total.timers + fired.timers,
                total.effects + fired.effects,
                total.deferred + fired.deferred,
            )
            # A ladder's next step armed by this batch may be due already (a scheduler
            # catching up after an outage): go on until a batch fires nothing.
            if fired.timers == 0:
                break
        if self.metrics is not None:
            self.metrics.timers_due.set(self.due(now))
        return total

    def due(self, now: datetime) -> int:
        el = self._log.eventlog
        try:
            return el.timers.count_due(now)
        finally:
            el.end()

    def close(self) -> None:
        self._log.close()

    def refresh_gauges(self, now: datetime | None = None) -> None:
        """``refloop_worklist_open{reason}`` from the store (a reason that emptied reads 0)."""
        if self.metrics is None:
            return
        el = self._log.eventlog
        try:
            counts = el.worklist.open_counts(now or self.clock())
        finally:
            el.end()
        for reason in self._reasons - counts.keys():
            self.metrics.worklist_open.labels(reason).set(0)
        for reason, n in counts.items():
            self.metrics.worklist_open.labels(reason).set(n)
        self._reasons |= counts.keys()

    def _batch(self, now: datetime) -> Fired:
        el = self._log.eventlog
        policy = self.policy()
        el.begin(wait=True)
        try:
            if not el.timers.scheduler_turn():
                el.end()
                return Fired()
            due = el.timers.due(now, self.batch)
            if not due:
                el.end()
                return Fired()
            referrals = {r.id: r for r in el.referrals({t.referral_id for t in due})}
            changes = Changes()
            fired: list[str] = []
            deferred: list[tuple[str, datetime]] = []
            kinds: list[str] = []
            for timer in due:
                referral = referrals.get(timer.referral_id)
                if referral is None:
                    fired.append(timer.id)
                    continue
                effects, armed = on_due(policy, referral, timer, now)
                done, referral, later = self._effects(el, referral, effects, now)
                referrals[referral.id] = referral
                changes = merge(changes, done)
                if later is not None:
                    deferred.append((timer.id, later))
                else:
                    fired.append(timer.id)
                changes = merge(changes, Changes(timers=list(armed.set)))
                kinds += [e.kind for e in effects]
            changes = merge(changes, Changes(fired_timers=fired))
            changes = with_policy(el, policy, changes, now)
            el.write(changes, now)
            cur = el.conn.cursor()
            try:
                el.timers.defer(cur, deferred, now)
            finally:
                cur.close()
            el.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                el.end()
            raise
        if self.metrics is not None:
            for kind in kinds:
                self.metrics.escalations.labels(kind).inc()
        if changes.deliveries:
            self.on_commit()
        return Fired(len(fired), tuple(kinds), len(deferred))

    def _effects(
        self, el: EventLog, referral: Referral, effects: Sequence[Effect], now: datetime
    ) -> tuple[Changes, Referral, datetime | None]:
        """One timer's effects on ``referral``; the time to try again when outreach was
        deferred (then nothing else of the timer is done now)."""
        changes = Changes()
        for effect in effects:
            if effect.kind == "worklist":
                item = NewItem(
                    key=effect.key,
                    reason=effect.reason,
                    referral_id=referral.id,
                    owner=effect.owner or "coordinator",
                    due_at=effect.due_at,
                    state=referral.state.value,
                    detail=f"policy rule {effect.rule}",
                )
                changes = merge(changes, Changes(worklist=[item]))
            elif effect.kind == "escalate":
                done, referral = append(el, referral, [_escalated(effect)], now)
                changes = merge(changes, done)
            elif effect.kind == "notify":
                done, referral = self._notify(el, referral, effect, now)
                changes = merge(changes, done)
            elif effect.kind == "outreach":
                done, referral, later = self._outreach(el, referral, effect, now)
                if later is not None:
                    return Changes(), referral, later
                changes = merge(changes, done)
        return changes, referral, None

    def _notify(
        self, el: EventLog, referral: Referral, effect: Effect, now: datetime
    ) -> tuple[Changes, Referral]:
        event = _escalated(effect, notify=effect.to)
        done, after = append(el, referral, [event], now)
        if not done.events:
            return done, after  # fired before (a replay): its deliveries exist too
        row = done.events[0]
        logged = LoggedEvent(row.type, dict(event.fields), row.occurred_at, now, 1.0)
        routed = self.outbound().route_named(effect.route, trigger_for(row, logged, after, ""))
        deliveries = [delivery_row(referral.id, row.id, d) for d in routed.deliveries]
        items = [
            NewItem(
                key=effect.key,
                reason="notice_not_sent",
                referral_id=referral.id,
                state=after.state.value,
                detail=f"{effect.to} notice by route {u.route_id}: {u.reason}",
            )
            for u in routed.unrouted
        ]
        return merge(done, Changes(deliveries=deliveries, worklist=items)), after

    def _outreach(
        self, el: EventLog, referral: Referral, effect: Effect, now: datetime
    ) -> tuple[Changes, Referral, datetime | None]:
        decision = (
            self.outreach(el, effect, referral, effect.key, now)
            if self.outreach is not None
            else OutreachDecision(reason="disabled")
        )
        if decision.defer_until is not None and decision.delivery is None:
            self._count(decision.channel or "none", "deferred")
            return Changes(), referral, decision.defer_until
        base = {
            "actor": ENGINE_ACTOR,
            "outreach.template": effect.template,
            "escalation.rule": effect.rule,
            **decision.fields,
        }
        if decision.delivery is not None:
            event = NewEvent(
                effect.key, Event.OUTREACH_PLANNED, base, now, f"policy:{effect.rule}", "policy"
            )
            self._count(decision.channel, "planned")
        else:
            fields = {**base, "outreach.outcome": decision.reason or "skipped"}
            event = NewEvent(
                effect.key, Event.OUTREACH_SKIPPED, fields, now, f"policy:{effect.rule}", "policy"
            )
            self._count(decision.channel or "none", "skipped")
        done, after = append(el, referral, [event], now)
        if not done.events:
            return done, after, None
        extra = Changes(
            deliveries=[decision.delivery] if decision.delivery is not None else [],
            worklist=[
                NewItem(
                    key=item_key(effect.key, reason),
                    reason=reason,
                    referral_id=referral.id,
                    state=after.state.value,
                    detail=detail,
                )
                for reason, detail in decision.notes
            ],
        )
        return merge(done, extra), after, None

    def _count(self, channel: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.outreach.labels(channel, outcome).inc()

    def refresh_kpis(self, now: datetime | None = None) -> None:
        """The referral KPI gauges, computed from the event log (a full read: they run
        every ``kpi_seconds``, not every tick)."""
        if self.metrics is None:
            return
        kpis = store_kpis(self._engine, now or self.clock())
        self.metrics.loop_closure.set(kpis.loop_closure_rate)
        self.metrics.open_30d.set(kpis.open_at_30_days_rate)
        for q, days in kpis.days_to_close.items():
            self.metrics.days_to_close.labels(f"{q:g}").set(days)

    def _kpis_due(self) -> None:
        if time.monotonic() >= self._next_kpis:
            self._next_kpis = time.monotonic() + self.kpi_seconds
            self.refresh_kpis()

    # -- the daemon's loop -----------------------------------------------------------------

    def every_tick(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the scheduler's thread after each tick (gauges)."""
        self._extra.append(fn)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="refloop-scheduler")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._call(self.close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        backoff = 0.0
        while not self._stopping:
            self._wake.clear()
            try:
                fired = await self._call(self.tick)
                if fired.timers:
                    log.info("scheduler.fired", timers=fired.timers, deferred=fired.deferred)
                for fn in self._extra:
                    await self._call(fn)
                backoff = 0.0
            except Exception as exc:
                backoff = min(max(backoff * 2, 1.0), 60.0)
                log.error("scheduler.failed", error=type(exc).__name__, retry_in_seconds=backoff)
                await self._call(self._log.drop)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff or self.poll_seconds):
                    await self._wake.wait()


def _escalated(effect: Effect, *, notify: str = "") -> NewEvent:
    fields: dict[str, Any] = {
        "actor": ENGINE_ACTOR,
        "escalation.reason": effect.reason,
        "escalation.rule": effect.rule,
    }
    if effect.level:
        fields["escalation.level"] = effect.level
    if notify:
        fields["escalation.notify"] = notify
    return NewEvent(
        effect.key, Event.REFERRAL_ESCALATED, fields, effect.at, f"policy:{effect.rule}", "policy"
    )
