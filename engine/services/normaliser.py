"""The normaliser: stored messages become referral events, after the ACK.

Theory of operation
-------------------
Ingest commits a message as ``received`` and acknowledges it; everything here happens
later, so a mapping that fails or a referral that does not exist yet never costs a
sender a NAK. A worker task on the daemon's event loop is woken by the writer after
each commit (and polls as a fallback, for messages another replica stored). Its
database work runs in one dedicated thread, on one connection:

1. read the oldest ``received`` messages (``batch_size``, id order);
2. decode them (MSH-18 or the listener's charset) and normalise them with the current
   mapping set and the listener's overlay — outside any lock, since this is the CPU part;
3. :meth:`EventLog.begin` takes the normaliser's turn (``BEGIN IMMEDIATE`` on SQLite,
   an advisory lock on PostgreSQL: one normaliser across all replicas), re-checks the
   messages are still ``received``, asks the store its five lookups,
   :func:`engine.services.pipeline.plan` decides, and everything commits at once.

If a batch fails, its messages are retried one per transaction, so a poison message
costs only itself: it ends as ``mapping_error`` with a diagnostic, and the rest go on.
A connection failure is not the messages' fault: the worker backs off and retries them.

Every ``retry_parked_seconds`` a sweep turns parked messages older than
``parked_ttl_seconds`` into ``unmatched`` and re-queues the others (a referral they match
only by patient and specialty may have appeared).

:class:`Processor` is also what ``refloop messages replay`` runs, in the CLI process:
the same decode, plan and write, on messages of any normalised status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import Any, TypeVar

from sqlalchemy import Engine

from engine.config import FhirSourceConfig, ListenerConfig, NormalizerConfig
from engine.domain.correlation import Key
from engine.domain.events import CanonicalEvent, Diagnostic, Normalised, Outcome, event_id
from engine.domain.projection import LoggedEvent, Referral, replay
from engine.domain.referral import Event, State
from engine.logs import get_logger
from engine.mapping.mapset import MappingSet
from engine.metrics import Metrics
from engine.policy.language import Policy
from engine.protocol.hl7v2 import HeaderError, codec_for, decode
from engine.services.mappings import NO_POLICY, MappingHolder
from engine.services.pipeline import (
    Inbound,
    Known,
    NeedsAuth,
    Report,
    Route,
    keys_of,
    lookup_values,
    plan,
)
from engine.services.policy_runtime import item_key, with_policy
from engine.store.eventlog import (
    Busy,
    Changes,
    EventLog,
    LogConnection,
    MessageUpdate,
    StoredMessage,
)
from engine.store.schema import is_fhir_message
from engine.store.worklist import NewItem

log = get_logger("refloop.normaliser")

T = TypeVar("T")

#: What the worker takes; a replay may take a message in any of these.
WORKER_STATUSES = frozenset({"received"})
REPLAYABLE = frozenset({"received", "processed", "ignored", "mapping_error", "parked", "unmatched"})


@dataclass(frozen=True, slots=True)
class Rebuilt:
    referrals: int
    changed: int  # projections that differed from what the log says
    events: int
    keys: int


@dataclass(frozen=True, slots=True)
class Source:
    """What normalising needs from the listener that received a message."""

    overlay: str | None = None
    default_charset: str = "utf-8"


def sources_from(
    listeners: Sequence[ListenerConfig], fhir: Sequence[FhirSourceConfig] = ()
) -> dict[str, Source]:
    """Every place a message can come from: MLLP listeners and FHIR sources."""
    out = {x.name: Source(x.mappings, x.default_charset) for x in listeners}
    out.update({x.name: Source(x.mappings) for x in fhir})
    return out


def normalise_message(mapping_set: MappingSet, m: StoredMessage, source: Source) -> Normalised:
    """Decode and normalise one stored message (HL7 v2, or a FHIR resource stored by the
    FHIR endpoints); never raises (a failure is the result)."""
    if is_fhir_message(m.message_type):
        return _normalise_resource(mapping_set, m, source)
    try:
        text = decode(m.raw, codec_for(m.charset or "", source.default_charset))
    except HeaderError as exc:
        return _failed(mapping_set, "undecodable", exc.reason, field=exc.field)
    try:
        return mapping_set.normalise(text, received_at=m.received_at, overlay=source.overlay)
    except Exception as exc:  # a mapping bug must cost this message only
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        # The exception text may quote message content: log its type and place only.
        log.error(
            "normaliser.mapping.crashed",
            message_id=m.id,
            error=type(exc).__name__,
            at=f"{where.filename}:{where.lineno}" if where else "",
        )
        return _failed(
            mapping_set,
            "mapping_crashed",
            f"normalisation raised {type(exc).__name__}; see the log line "
            "normaliser.mapping.crashed for where",
        )


def _normalise_resource(mapping_set: MappingSet, m: StoredMessage, source: Source) -> Normalised:
    try:
        resource = json.loads(m.raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _failed(mapping_set, "undecodable", "the stored FHIR resource is not JSON")
    if not isinstance(resource, dict):
        return _failed(mapping_set, "undecodable", "the stored FHIR resource is not an object")
    try:
        return mapping_set.normalise_resource(
            resource, received_at=m.received_at, overlay=source.overlay
        )
    except Exception as exc:  # a mapping bug must cost this message only
        log.error("normaliser.mapping.crashed", message_id=m.id, error=type(exc).__name__)
        return _failed(
            mapping_set,
            "mapping_crashed",
            f"normalisation raised {type(exc).__name__}; see the log line "
            "normaliser.mapping.crashed for where",
        )


def _failed(mapping_set: MappingSet, code: str, message: str, *, field: str = "") -> Normalised:
    return Normalised(
        Outcome.MAPPING_ERROR,
        diagnostics=(Diagnostic(code, message, field=field),),
        mapping_digest=mapping_set.digest,
    )


def is_connection_error(exc: BaseException) -> bool:
    """The database or the link failed (retry later), rather than this batch's data."""
    name = type(getattr(exc, "orig", None) or exc).__name__
    return name in ("OperationalError", "InterfaceError")


def unmatched_item(message_id: int) -> NewItem:
    return NewItem(
        key=item_key(f"message:{message_id}", "unmatched_message"),
        reason="unmatched_message",
        message_id=message_id,
        detail=f"message {message_id} matched no referral within the parked TTL "
        "(see `refloop messages show`)",
    )


class Processor:
    """Normalise and apply messages on one connection (one thread at a time)."""

    def __init__(
        self,
        engine: Engine,
        mapping_set: Callable[[], MappingSet],
        sources: Mapping[str, Source],
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        share_cpu: bool = False,
        router: Callable[[], Route | None] | None = None,
        policy: Callable[[], Policy] | None = None,
        needs_auth: NeedsAuth | None = None,
    ) -> None:
        self._engine = engine
        self._needs_auth = needs_auth
        self._policy = policy or (lambda: NO_POLICY)
        self._mapping_set = mapping_set
        self._router = router or (lambda: None)
        self._share_cpu = share_cpu
        self._sources = dict(sources)
        self._metrics = metrics
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self._conn = LogConnection(engine)

    @property
    def eventlog(self) -> EventLog:
        return self._conn.eventlog

    def close(self) -> None:
        self._conn.close()

    def drop(self) -> None:
        """Forget the connection after an error (the next use opens a fresh one)."""
        self._conn.drop()

    # -- the work ----------------------------------------------------------------------

    def next_batch(self, limit: int) -> list[StoredMessage]:
        el = self.eventlog
        try:
            return el.received(limit)
        finally:
            el.end()

    def process(
        self,
        messages: Sequence[StoredMessage],
        *,
        statuses: frozenset[str] = WORKER_STATUSES,
        wait: bool = False,
    ) -> list[Report]:
        """Normalise and apply ``messages`` (id order). Returns a report per message
        handled: fewer than given when the batch was cut after releasing parked ones.
        Raises :class:`Busy` (another normaliser's turn) or a connection error."""
        if not messages:
            return []
        mapping_set = self._mapping_set()
        inbound = []
        for m in messages:
            inbound.append(self._normalise(mapping_set, m))
            if self._share_cpu:
                # In the daemon's own process, mapping is pure CPU under the GIL: yielding
                # between messages lets the listeners and the writer (whose senders wait
                # for an ACK) go first. A separate normaliser process has no one to wait.
                time.sleep(0)
        try:
            return self._apply(messages, inbound, statuses, wait)
        except Busy:
            raise
        except Exception as exc:
            self.drop()
            if is_connection_error(exc):
                raise
            log.warning(
                "normaliser.batch.failed",
                size=len(messages),
                error=type(exc).__name__,
                first=messages[0].id,
            )
            if len(messages) == 1:
                return [self._give_up(messages[0], exc)]
        # One per transaction: a poison message costs only itself.
        reports: list[Report] = []
        for m, item in zip(messages, inbound, strict=True):
            try:
                reports += self._apply([m], [item], statuses, wait=True)
            except Exception as exc:
                self.drop()
                if is_connection_error(exc):
                    raise
                reports.append(self._give_up(m, exc))
        return reports

    def _normalise(self, mapping_set: MappingSet, m: StoredMessage) -> Inbound:
        started = time.perf_counter()
        result = normalise_message(mapping_set, m, self._sources.get(m.listener, Source()))
        if self._metrics is not None:
            self._metrics.normalize.observe(time.perf_counter() - started)
        return Inbound(m.id, m.received_at, result, m.listener)

    def _apply(
        self,
        messages: Sequence[StoredMessage],
        inbound: Sequence[Inbound],
        statuses: frozenset[str],
        wait: bool,
    ) -> list[Report]:
        el = self.eventlog
        el.begin(wait=wait)
        try:
            now = self.clock()
            current = el.statuses(m.id for m in messages)
            live = [i for i in inbound if current.get(i.message_id) in statuses]
            skipped = {
                m.id: Report(m.id, current.get(m.id, "missing"))
                for m in messages
                if current.get(m.id) not in statuses
            }
            values = lookup_values(i.result for i in live)
            pairs = el.keys(values) if values else []
            index: dict[Key, set[str]] = {}
            for key, rid in pairs:
                index.setdefault(key.normalised(), set()).add(rid)
            ids = [
                event_id(i.message_id, ev)
                for i in live
                if i.result.outcome is Outcome.PROCESSED
                for ev in i.result.events
            ]
            referrals = {r.id: r for r in el.referrals({rid for _, rid in pairs})} if pairs else {}
            known = Known(
                index={k: frozenset(v) for k, v in index.items()},
                referrals=referrals,
                events=el.known_events(ids) if ids else {},
            )
            route = self._router()
            planned = plan(live, known, now, route, needs_auth=self._needs_auth)
            # Two lookups only when the first plan shows they matter (then plan again
            # from scratch: planning is cheap, and rare here):
            # - open referrals of patients whose message parked with the clues the
            #   heuristic needs (most messages correlate by key);
            # - parked messages waiting for a key this batch indexes anew — not for every
            #   key it mentions, which thousands of parked messages may share. Knowing
            #   them, the plan cuts the batch after the message that releases them.
            hopeful = {
                i.result.clues["patient"]
                for i, r in zip(live, planned.reports, strict=False)
                if r.status == "parked"
                and i.result.clues.get("patient")
                and i.result.clues.get("specialty")
            }
            extra = (
                [r for r in el.open_referrals(hopeful) if r.id not in referrals] if hopeful else []
            )
            if extra:
                known = replace(known, referrals={**referrals, **{r.id: r for r in extra}})
                planned = plan(live, known, now, route, needs_auth=self._needs_auth)
            fresh = {k.value for k, _ in planned.changes.keys}
            waiting = el.parked(fresh) if fresh else []
            if waiting:
                planned = plan(
                    live, replace(known, parked=waiting), now, route, needs_auth=self._needs_auth
                )
            changes = with_policy(el, self._policy(), planned.changes, now, stored=known.referrals)
            el.write(changes, now)
            el.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                el.end()
            raise
        self._count(planned.changes, planned.reports, inbound, now)
        handled = {r.message_id: r for r in planned.reports}
        # Messages after a cut are untouched; ones no longer ours are reported as they are.
        cut = live[planned.handled].message_id if planned.handled < len(live) else None
        return [
            handled[m.id] if m.id in handled else skipped[m.id]
            for m in messages
            if m.id in handled or (m.id in skipped and (cut is None or m.id < cut))
        ]

    def _give_up(self, m: StoredMessage, exc: BaseException) -> Report:
        """Mark a message the store refused as ``mapping_error`` so it blocks nobody."""
        note = Diagnostic(
            "store_failed",
            f"applying this message's events failed ({type(exc).__name__}); "
            "replay it after the cause is fixed",
        )
        el = self.eventlog
        try:
            el.begin(wait=True)
            el.write(
                Changes(messages=[MessageUpdate(m.id, "mapping_error", (note.as_dict(),))]),
                self.clock(),
            )
            el.commit()
        except Exception:
            self.drop()
            raise
        log.error("normaliser.message.failed", message_id=m.id, error=type(exc).__name__)
        if self._metrics is not None:
            self._metrics.mapping_errors.labels("none").inc()
        return Report(m.id, "mapping_error", diagnostics=(note,))

    def _count(
        self,
        changes: Changes,
        reports: Sequence[Report],
        inbound: Sequence[Inbound],
        now: datetime,
    ) -> None:
        if self._metrics is None:
            return
        for row in changes.events:
            self._metrics.events.labels(row.type.value).inc()
        received = {i.message_id: i.received_at for i in inbound}
        for r in reports:
            if r.status == "mapping_error":
                self._metrics.mapping_errors.labels(r.mapping_id or "none").inc()
            if r.status in ("processed", "ignored", "mapping_error") and r.message_id in received:
                lag = (now - received[r.message_id]).total_seconds()
                self._metrics.normalize_lag.observe(max(lag, 0.0))

    # -- housekeeping ------------------------------------------------------------------

    def rebuild(self) -> Rebuilt:
        """Fold every referral's log from nothing and rewrite the projections and the key
        index (``refloop referrals rebuild``): one transaction, holding the turn."""
        el = self.eventlog
        el.begin(wait=True)
        try:
            before = {r.id: r for r in el.all_referrals()}
            rebuilt: list[Referral] = []
            keys: dict[tuple[Key, str], None] = {}
            events = 0
            for rid, group in groupby(el.all_events(), key=lambda e: e.referral_id):
                logged = list(group)
                events += len(logged)
                referral, _ = replay(
                    rid,
                    [
                        LoggedEvent(e.type, e.fields, e.occurred_at, e.recorded_at, e.confidence)
                        for e in logged
                    ],
                )
                if referral is None:
                    continue  # a log that never created its referral: left as it is
                rebuilt.append(referral)
                for e in logged:
                    for key in keys_of(CanonicalEvent(e.type, e.fields, e.rule_id)):
                        keys[(key, rid)] = None
            el.replace_projections(rebuilt, list(keys))
            el.commit()
        except BaseException:
            self.drop()
            raise
        changed = sum(1 for r in rebuilt if before.get(r.id) != r)
        return Rebuilt(len(rebuilt), changed, events, len(keys))

    def sweep(self, ttl: timedelta, *, wait: bool = False) -> tuple[list[int], int]:
        """Parked past ``ttl`` → ``unmatched``; the rest back to ``received``.
        Returns (ids now unmatched, how many were re-queued)."""
        el = self.eventlog
        el.begin(wait=wait)
        try:
            now = self.clock()
            expired = el.expire_parked(now - ttl, now)
            if expired:
                # An unmatched message is an exception for a person, not a log line.
                el.write(Changes(worklist=[unmatched_item(mid) for mid in expired]), now)
            requeued = el.requeue_parked()
            el.commit()
        except BaseException:
            self.drop()
            raise
        if expired:
            log.warning("normaliser.parked.expired", count=len(expired), first=expired[0])
        return expired, requeued

    def refresh_gauges(self) -> None:
        if self._metrics is None:
            return
        el = self.eventlog
        try:
            counts = el.counts()
            states = el.states()
        finally:
            el.end()
        self._metrics.normalizer_backlog.set(counts.get("received", 0))
        self._metrics.parked.set(counts.get("parked", 0))
        self._metrics.unmatched.set(counts.get("unmatched", 0))
        for state in State:
            self._metrics.referrals.labels(state.value).set(states.get(state.value, 0))


class NormaliserWorker:
    """The daemon's normaliser: an asyncio task whose database work runs in one thread."""

    GAUGE_SECONDS = 5.0
    DRAIN_SECONDS = 2.0
    MAX_BACKOFF = 30.0

    def __init__(
        self,
        engine: Engine,
        mappings: MappingHolder,
        metrics: Metrics,
        sources: Mapping[str, Source],
        config: NormalizerConfig,
        *,
        reload_seconds: float = 2.0,
        clock: Callable[[], datetime] | None = None,
        share_cpu: bool = True,
    ) -> None:
        self.config = config
        self.mappings = mappings
        self.metrics = metrics
        self.reload_seconds = reload_seconds
        self.processor = Processor(
            engine,
            lambda: self.mappings.current,
            sources,
            metrics,
            clock=clock,
            share_cpu=share_cpu,
            router=mappings.router,
            policy=lambda: self.mappings.policy,
            needs_auth=mappings.needs_auth,
        )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="refloop-normaliser")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._woken = False
        self._reload = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # Called on the event loop after a batch committed (the dispatcher may have new
        # deliveries to look at).
        self.on_batch: Callable[[], None] | None = None
        metrics.declare_referral_core([s.value for s in State], [e.value for e in Event])

    # -- control (event loop) ------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="refloop-normaliser")

    async def stop(self) -> None:
        """Finish the batch in hand; what is still ``received`` waits for the next start."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._call(self.processor.close)
        self._executor.shutdown(wait=True)

    def wake_threadsafe(self) -> None:
        """Called by the writer after each commit, from its thread: at most one wake-up
        of the event loop is pending at a time."""
        if self._woken or self._loop is None:
            return
        self._woken = True
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._wake.set)

    def request_reload(self) -> None:
        """SIGHUP: reload the mapping set now."""
        self._reload = True
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        clock = time.monotonic
        next_sweep = clock() + self.config.retry_parked_seconds
        next_gauges = last_gauges = 0.0
        next_reload = clock() + self.reload_seconds
        backoff = 0.0
        busy_wait = 0.005
        ttl = timedelta(seconds=self.config.parked_ttl_seconds)
        while not self._stopping:
            self._woken = False
            self._wake.clear()
            busy = False
            try:
                if self._reload or clock() >= next_reload:
                    forced, self._reload = self._reload, False
                    await self._call(self.mappings.reload if forced else self.mappings.check)
                    next_reload = clock() + self.reload_seconds
                busy, worked = await self._drain()
                if not busy and clock() >= next_sweep:
                    await self._call(self.processor.sweep, ttl)
                    next_sweep = clock() + self.config.retry_parked_seconds
                    busy, _ = await self._drain()  # what the sweep re-queued
                    worked = True
                if worked:
                    # Counts move with work; reading them costs two grouped queries.
                    next_gauges = min(next_gauges, last_gauges + 1.0)
                if clock() >= next_gauges:
                    await self._call(self.processor.refresh_gauges)
                    last_gauges = clock()
                    next_gauges = last_gauges + self.GAUGE_SECONDS
                backoff = 0.0
            except Busy:
                busy = True
            except Exception as exc:
                backoff = min(max(backoff * 2, 0.5), self.MAX_BACKOFF)
                log.error("normaliser.failed", error=type(exc).__name__, retry_in_seconds=backoff)
                await self._call(self.processor.drop)
            # The turn is often the dispatcher recording one outcome (milliseconds): try
            # again soon, then less and less often, up to the poll interval (a replica).
            busy_wait = min(busy_wait * 2, self.config.poll_seconds) if busy else 0.005
            if backoff or busy:
                # After a failure, or while another holds the turn, commits do not wake
                # us (each would cost a futile attempt): only the timer does.
                self._woken = True
                timeout = backoff or busy_wait
            else:
                timeout = max(0.0, min(self.config.poll_seconds, next_reload - clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _drain(self) -> tuple[bool, bool]:
        """Process batches until nothing is ``received`` (or for at most
        ``DRAIN_SECONDS``, so reloads, the sweep and the gauges still run under a
        steady stream; the loop then comes straight back). Returns (another
        normaliser holds the turn, any message was handled)."""
        worked = False
        until = time.monotonic() + self.DRAIN_SECONDS
        while not self._stopping:
            if time.monotonic() > until:
                self._wake.set()  # more to do: no waiting before the next round
                return False, worked
            batch = await self._call(self.processor.next_batch, self.config.batch_size)
            if not batch:
                return False, worked
            try:
                reports = await self._call(self.processor.process, batch)
            except Busy:
                return True, worked
            worked = worked or bool(reports)
            if self.on_batch is not None and any(r.new_events for r in reports):
                self.on_batch()
            for r in reports:
                if r.status == "mapping_error":
                    log.warning(
                        "normaliser.message.mapping_error",
                        message_id=r.message_id,
                        mapping=r.mapping_id,
                        codes=[d.code for d in r.diagnostics],
                    )
                elif r.anomalies:
                    log.info(
                        "normaliser.message.anomaly",
                        message_id=r.message_id,
                        referrals=list(r.referrals),
                        anomalies=list(r.anomalies),
                    )
        return False, worked
