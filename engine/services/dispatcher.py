"""The dispatcher: outbox rows become deliveries, and their outcomes become events.

Theory of operation
-------------------
Routing has already written each delivery into the outbox, in the transaction of the
event that caused it (:mod:`engine.store.outbox`). The dispatcher is an asyncio task on
the daemon's event loop; its database work runs in one dedicated thread on one
connection, its sending in the channels' own coroutines:

1. **claim** due rows, per channel, no more than the channel's free ``max_in_flight``
   slots (per-referral FIFO per channel is the claim query's);
2. **render** a row the first time it is tried (:mod:`engine.outbound.packets`, in the
   thread: it is CPU work) and store the payload, so every retry sends the same bytes
   with the same control id; a payload that cannot be built or does not validate is a
   permanent failure with the reason, before anything is sent;
3. **send** through the channel, bounded by the channel's timeout;
4. **record**, in one transaction holding the event log's turn: the delivery's outcome
   and the referral events it becomes (``referral.sent`` / ``referral.delivered`` for a
   packet, ``delivery.succeeded`` for a write-back, ``delivery.failed`` when it is
   dead-lettered), folded into the projection like any other event. A failure worth
   retrying goes back to ``pending`` with its next time (pure policy:
   :mod:`engine.outbound.retry`).

Never "send, then record": if the process dies between 3 and 4, the row is still
``in_flight``; its lease runs out, it is claimed again and sent again, and the peer
drops the repeat by its idempotency key. Event ids derive from the delivery and the
outcome, so recording twice appends nothing twice.

Events the dispatcher records are not routed again (no delivery causes a delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine

from channels.base import (
    Channel,
    ChannelError,
    ChannelSettings,
    Envelope,
    PermanentError,
    Receipt,
    RetryableError,
)
from engine.config import OutboundConfig
from engine.domain.projection import Referral
from engine.domain.referral import Event, State
from engine.logs import get_logger
from engine.metrics import Metrics
from engine.outbound.model import (
    PacketContext,
    Party,
    ReferralView,
    Rendered,
    RenderError,
    Specialist,
    TriggerEvent,
)
from engine.outbound.packets import Renderer
from engine.outbound.retry import DeadLetter, Policy, after_failure, success_events
from engine.policy.language import Policy as ReferralPolicy
from engine.protocol.hl7v2 import HeaderError, codec_for, decode
from engine.services.mappings import NO_POLICY
from engine.services.policy_runtime import NewEvent, append, with_policy
from engine.store.eventlog import Changes, EventLog, LogConnection
from engine.store.outbox import Delivery
from engine.store.schema import is_fhir_message

log = get_logger("refloop.dispatcher")

T = TypeVar("T")

_EVENT_NAMESPACE = uuid.UUID("5c1f2a9e-8d1b-4f7e-9a3c-6e2b1d0f4a77")


def outcome_event_id(delivery_key: str, event: Event) -> str:
    """Stable: recording the same outcome twice (after a crash) appends it once."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{delivery_key}/{event.value}"))


def control_id(delivery_key: str) -> str:
    """MSH-10 for a delivery: stable across retries (the peer's duplicate check), unique
    across databases (not the row id, which a fresh database reuses), 20 characters."""
    return "RL" + delivery_key.replace("-", "")[:18].upper()


_WORKER_RENDERERS: Mapping[str, Renderer] | None = None


def render_named(format_name: str, ctx: PacketContext) -> Rendered:
    """A render process's work: the registry's renderer for ``format_name``."""
    global _WORKER_RENDERERS
    if _WORKER_RENDERERS is None:
        from engine.outbound.packets.registry import renderers

        _WORKER_RENDERERS = renderers()
    return _WORKER_RENDERERS[format_name](ctx)


def policy_of(settings: ChannelSettings) -> Policy:
    return Policy(
        max_attempts=settings.max_attempts,
        max_age=timedelta(seconds=settings.max_age_seconds),
        initial=settings.backoff_initial_seconds,
        cap=settings.backoff_max_seconds,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to."""

    status: str  # delivered | sent | retry | dead
    receipt: Receipt | None = None
    reason: str = ""
    retry_at: datetime | None = None


class DispatchStore(LogConnection):
    """The dispatcher's database work, on one connection (one thread at a time).
    ``policy``: the referral policy its outcome events pass through (a dead-lettered
    delivery is a worklist item; ``referral.sent`` starts the scheduling window)."""

    def __init__(self, engine: Engine, policy: Callable[[], ReferralPolicy] | None = None) -> None:
        super().__init__(engine)
        self.policy: Callable[[], ReferralPolicy] = policy or (lambda: NO_POLICY)

    def claim(self, now: datetime, worker: str, wanted: Mapping[str, int]) -> list[Delivery]:
        out: list[Delivery] = []
        for channel, n in wanted.items():
            if n > 0:
                out += self.eventlog.outbox.claim(now, worker, n, [channel])
        return out

    def reclaim(self, before: datetime, worker: str) -> int:
        return self.eventlog.outbox.reclaim(before, worker)

    def counts(self) -> dict[tuple[str, str], int]:
        return self.eventlog.outbox.counts()

    def context(
        self,
        d: Delivery,
        now: datetime,
        sender: Party,
        recipient: Specialist | None,
        options: Mapping[str, str],
    ) -> PacketContext:
        """Everything the renderer reads, from the log and the stored messages."""
        el = self.eventlog
        ob = el.outbox
        try:
            ev = ob.source_event(d.event_id)
            found = el.referrals([d.referral_id])
            if ev is None or not found:
                raise RenderError("the delivery's event or referral is no longer in the log")
            referral = found[0]
            order_id = ob.order_message_id(d.referral_id)
            raws = ob.raw_messages([i for i in (order_id, ev.message_id) if i is not None])
        finally:
            el.end()
        sources: dict[str, str] = {}
        for role, mid in (("order", order_id), ("trigger", ev.message_id)):
            if mid is not None and mid in raws:
                raw, charset, mtype = raws[mid]
                if is_fhir_message(mtype):
                    continue  # renderers read HL7 v2 sources; a FHIR one's data is canonical
                with contextlib.suppress(HeaderError, LookupError, UnicodeDecodeError):
                    sources[role] = decode(raw, codec_for(charset or "", "utf-8"))
        receiver = Party(
            d.receiver_application or (recipient.receiver.application if recipient else ""),
            d.receiver_facility or (recipient.receiver.facility if recipient else ""),
        )
        return PacketContext(
            delivery_id=d.id,
            idempotency_key=d.key,
            control_id=control_id(d.key),
            now=now,
            referral=ReferralView(
                referral.id, referral.state, referral.created_at, referral.updated_at, referral.data
            ),
            event=TriggerEvent(
                id=ev.id,
                type=Event(ev.type),
                fields=ev.fields,
                occurred_at=ev.occurred_at,
                sequence=ev.sequence,
                state_before=State(ev.state_before) if ev.state_before else None,
                state_after=State(ev.state_after) if ev.state_after else None,
                message_id=ev.message_id,
            ),
            sender=sender,
            receiver=receiver,
            recipient=recipient,
            sources=sources,
            options=dict(options),
        )

    def save_render(self, d: Delivery, rendered: Rendered) -> None:
        self.eventlog.outbox.save_render(
            d.id, rendered.payload, rendered.content_type, dict(rendered.metadata)
        )

    def record(self, d: Delivery, outcome: Outcome, now: datetime) -> bool:
        """The outcome and its events, in one transaction. False: the row was no longer
        ours (our lease ran out and another worker took it), so nothing was written."""
        el = self.eventlog
        el.begin(wait=True)
        try:
            ob = el.outbox
            if outcome.status == "retry":
                assert outcome.retry_at is not None
                ok = ob.later(d.id, now, outcome.retry_at, outcome.reason)
                el.commit() if ok else el.end()
                return ok
            receipt = (
                {
                    "peer_reference": outcome.receipt.peer_reference,
                    "detail": outcome.receipt.detail,
                    "confirmed": outcome.receipt.confirmed,
                }
                if outcome.receipt is not None
                else None
            )
            ok = ob.finish(d.id, outcome.status, now, error=outcome.reason or None, receipt=receipt)
            if not ok:
                el.end()
                return False
            kinds = (
                (Event.DELIVERY_FAILED,)
                if outcome.status == "dead"
                else success_events(d.kind, confirmed=outcome.status == "delivered")
            )
            events, before = self._events(el, d, kinds, outcome, now)
            stored = {before.id: before} if before is not None else None
            el.write(with_policy(el, self.policy(), events, now, stored=stored), now)
            el.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                el.end()
            raise
        return True

    def _events(
        self, el: EventLog, d: Delivery, kinds: tuple[Event, ...], outcome: Outcome, now: datetime
    ) -> tuple[Changes, Referral | None]:
        """The outcome's events folded into the referral, and the referral as it was (the
        policy refolds from there without reading it again)."""
        found = el.referrals([d.referral_id])
        if not found:
            return Changes(), None
        referral = found[0]
        ids = [outcome_event_id(d.key, k) for k in kinds]
        fields: dict[str, Any] = {
            "delivery.id": d.id,
            "delivery.kind": d.kind,
            "delivery.channel": d.channel,
            "delivery.format": d.format,
            "delivery.route": d.route_id,
            "delivery.attempts": d.attempts,
        }
        if d.recipient_id:
            fields["delivery.recipient"] = d.recipient_id
        if outcome.receipt is not None:
            if outcome.receipt.peer_reference:
                fields["delivery.peer_reference"] = outcome.receipt.peer_reference
            if outcome.receipt.detail:
                fields["delivery.detail"] = outcome.receipt.detail
        if outcome.status == "dead":
            fields["delivery.error"] = outcome.reason
        events = [
            NewEvent(eid, kind, fields, now, f"route:{d.route_id}", "delivery")
            for kind, eid in zip(kinds, ids, strict=True)
        ]
        changes, _ = append(el, referral, events, now)
        return changes, referral


@dataclass
class _Slot:
    channel: Channel
    settings: ChannelSettings
    policy: Policy
    busy: int = 0


class Dispatcher:
    """The daemon's dispatcher task (see the module docstring)."""

    GAUGE_SECONDS = 5.0

    def __init__(
        self,
        engine: Engine,
        channels: Mapping[str, tuple[Channel, ChannelSettings]],
        renderers: Mapping[str, Renderer],
        directory: Callable[[str], Specialist | None],
        config: OutboundConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] | None = None,
        worker: str | None = None,
        route_options: Callable[[str], Mapping[str, str]] | None = None,
        render_processes: int = 0,
        policy: Callable[[], ReferralPolicy] | None = None,
    ) -> None:
        self.config = config
        # > 0 only with the registry's own renderers (a worker looks them up by name).
        self.render_processes = render_processes
        self._render_pool: Executor | None = None
        self.route_options = route_options or (lambda _route: {})
        self.metrics = metrics
        self.renderers = renderers
        self.directory = directory
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.worker = worker or f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.sender = Party(config.sending_application, config.sending_facility)
        self.slots = {
            name: _Slot(ch, settings, policy_of(settings))
            for name, (ch, settings) in channels.items()
        }
        self.store = DispatchStore(engine, policy)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="refloop-dispatcher")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._woken = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        for name in self.slots:
            metrics.declare_channel(name)

    # -- control (event loop) ------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="refloop-dispatcher")

    def wake_threadsafe(self) -> None:
        """Something was enqueued (called from another thread): look now."""
        if self._woken or self._loop is None:
            return
        self._woken = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self) -> None:
        """Stop claiming; give deliveries on the wire ``stop_seconds`` to finish; the
        rest stay in flight and are taken back by the next start (at-least-once)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._attempts:
            _, pending = await asyncio.wait(self._attempts, timeout=self.config.stop_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for slot in self.slots.values():
            with contextlib.suppress(Exception):
                await slot.channel.aclose()
        if self._render_pool is not None:
            self._render_pool.shutdown(wait=True, cancel_futures=True)
        await self._call(self.store.close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.0
        next_gauges = 0.0
        next_reclaim = 0.0
        first = True
        while not self._stopping:
            self._woken = False
            self._wake.clear()
            try:
                now = self.clock()
                if time.monotonic() >= next_reclaim:
                    # At start on SQLite nobody else can hold a row: take back every
                    # in-flight row at once; otherwise only those past their lease.
                    lease = 0.0 if first and self._single_process() else self.config.lease_seconds
                    taken = await self._call(
                        self.store.reclaim, now - timedelta(seconds=lease), self.worker
                    )
                    if taken:
                        log.warning("dispatcher.reclaimed", count=taken)
                    first = False
                    next_reclaim = time.monotonic() + min(self.config.lease_seconds / 4, 60.0)
                wanted = {
                    name: min(slot.settings.max_in_flight - slot.busy, self.config.claim_batch)
                    for name, slot in self.slots.items()
                }
                claimed = await self._call(self.store.claim, now, self.worker, wanted)
                for d in claimed:
                    self._begin(d)
                if time.monotonic() >= next_gauges:
                    await self._gauges()
                    next_gauges = time.monotonic() + self.GAUGE_SECONDS
                backoff = 0.0
            except Exception as exc:
                backoff = min(max(backoff * 2, 0.5), 30.0)
                log.error("dispatcher.failed", error=type(exc).__name__, retry_in_seconds=backoff)
                await self._call(self.store.drop)
            timeout = backoff or self.config.poll_seconds
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _single_process(self) -> bool:
        return self.store.dialect == "sqlite"

    def _begin(self, d: Delivery) -> None:
        slot = self.slots.get(d.channel)
        if slot is not None:
            slot.busy += 1
        task = asyncio.get_running_loop().create_task(self._attempt(d, slot))
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    async def _attempt(self, d: Delivery, slot: _Slot | None) -> None:
        try:
            outcome = await self._try(d, slot)
            await self._record(d, outcome)
        except Exception as exc:
            # The database failed while recording: the row stays in flight and its
            # lease brings it back; nothing is lost.
            log.error("dispatcher.record.failed", delivery=d.id, error=type(exc).__name__)
            await self._call(self.store.drop)
        finally:
            if slot is not None:
                slot.busy -= 1
                self._wake.set()  # a slot is free: claim more

    async def _try(self, d: Delivery, slot: _Slot | None) -> Outcome:
        if slot is None:
            return Outcome("dead", reason=f"channel {d.channel!r} is not configured in [channels]")
        payload, content_type, meta = d.payload, d.content_type, d.meta
        if payload is None:
            renderer = self.renderers.get(d.format)
            if renderer is None:
                return Outcome("dead", reason=f"unknown packet format {d.format!r}")
            try:
                rendered = await self._render(d, renderer)
            except RenderError as exc:
                return Outcome("dead", reason=f"payload not built: {exc.reason}")
            except BrokenExecutor:
                # The render process died (not this delivery's fault): a new one is
                # started for the next try.
                self._render_pool = None
                return self._failed(d, slot, RetryableError("the render process died"))
            payload, content_type, meta = (
                rendered.payload,
                rendered.content_type,
                dict(rendered.metadata),
            )
        envelope = Envelope(
            idempotency_key=d.key,
            delivery_id=d.id,
            referral_id=d.referral_id,
            kind=d.kind,
            payload=payload,
            content_type=content_type or "application/octet-stream",
            attempt=d.attempts,
            endpoint=d.endpoint,
            metadata={**meta, "control_id": meta.get("control_id") or control_id(d.key)},
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(slot.settings.timeout_seconds + 5.0):
                receipt = await slot.channel.send(envelope)
        except ChannelError as exc:
            return self._failed(d, slot, exc)
        except TimeoutError:
            return self._failed(d, slot, RetryableError("channel timed out"))
        except Exception as exc:  # a plugin bug must not lose the delivery
            log.error("dispatcher.channel.crashed", channel=d.channel, error=type(exc).__name__)
            return self._failed(d, slot, RetryableError(f"channel raised {type(exc).__name__}"))
        finally:
            self.metrics.delivery_seconds.labels(d.channel).observe(time.perf_counter() - started)
        return Outcome("delivered" if receipt.confirmed else "sent", receipt=receipt)

    async def _render(self, d: Delivery, renderer: Renderer) -> Rendered:
        """Read the context (store thread), render (a render process when configured:
        hl7apy's validation is CPU the daemon's core is short of; else the store
        thread), keep the payload (store thread)."""
        recipient = self.directory(d.recipient_id) if d.recipient_id else None
        ctx = await self._call(
            self.store.context,
            d,
            self.clock(),
            self.sender,
            recipient,
            self.route_options(d.route_id),
        )
        pool = self._pool()
        try:
            if pool is not None:
                loop = asyncio.get_running_loop()
                rendered = await loop.run_in_executor(pool, render_named, d.format, ctx)
            else:
                rendered = await self._call(renderer, ctx)
        except (RenderError, BrokenExecutor):
            raise
        except Exception as exc:  # a renderer bug: permanent for this delivery, logged
            log.error("dispatcher.render.crashed", format=d.format, error=type(exc).__name__)
            raise RenderError(f"renderer {d.format} raised {type(exc).__name__}") from None
        await self._call(self.store.save_render, d, rendered)
        return rendered

    def _pool(self) -> Executor | None:
        if self.render_processes <= 0:
            return None
        if self._render_pool is None:
            self._render_pool = ProcessPoolExecutor(
                self.render_processes, mp_context=multiprocessing.get_context("spawn")
            )
        return self._render_pool

    def _failed(self, d: Delivery, slot: _Slot, exc: ChannelError) -> Outcome:
        now = self.clock()
        decision = after_failure(
            key=d.key,
            attempt=d.attempts,
            created_at=d.age_from,
            now=now,
            retryable=not isinstance(exc, PermanentError) and exc.retryable,
            reason=exc.reason,
            retry_after=exc.retry_after if isinstance(exc, RetryableError) else None,
            policy=slot.policy,
        )
        if isinstance(decision, DeadLetter):
            return Outcome("dead", reason=decision.reason)
        return Outcome("retry", reason=decision.reason, retry_at=decision.when)

    async def _record(self, d: Delivery, outcome: Outcome) -> None:
        ok = await self._call(self.store.record, d, outcome, self.clock())
        self.metrics.deliveries.labels(d.channel, outcome.status).inc()
        event = f"dispatcher.{outcome.status}"  # delivered | sent | retry | dead
        details: dict[str, Any] = {"delivery": d.id, "channel": d.channel, "attempt": d.attempts}
        if outcome.reason:
            details["reason"] = outcome.reason
        if outcome.retry_at is not None:
            details["retry_at"] = outcome.retry_at.isoformat()
        if not ok:
            log.warning("dispatcher.lost_lease", **details)
        elif outcome.status == "dead":
            log.error(event, **details)
        elif outcome.status == "retry":
            log.warning(event, **details)
        else:
            log.info(event, **details)

    async def _gauges(self) -> None:
        counts = await self._call(self.store.counts)
        for name in self.slots:
            pending = counts.get((name, "pending"), 0) + counts.get((name, "in_flight"), 0)
            self.metrics.outbox_pending.labels(name).set(pending)
            self.metrics.outbox_dead.labels(name).set(counts.get((name, "dead"), 0))

    # -- for tests and the CLI -------------------------------------------------------------

    async def idle(self, within: float = 10.0) -> None:
        """Wait until nothing is in flight (tests)."""
        async with asyncio.timeout(within):
            while self._attempts:
                await asyncio.wait(set(self._attempts))
