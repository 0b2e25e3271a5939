"""The outbox and the dispatcher on real databases (SQLite and PostgreSQL).

Messages are stored as ingest stores them and normalised by the real normaliser, with a
router that sends every ``referral.created`` as a packet and every booking as a
write-back; the dispatcher then delivers through the shipped fake channel (the seam's
fake: the real channels are tested against real peers in tests/channels/ and end to
end). Time is a clock the test moves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from channels.base import PermanentError, Receipt, RetryableError
from channels.testing import FakeChannel, FakeSettings
from engine.config import OutboundConfig
from engine.domain.referral import Event
from engine.metrics import Metrics
from engine.outbound.model import DeliveryRequest, Party, Trigger
from engine.outbound.packets import Renderer
from engine.outbound.packets.event_json import render_event
from engine.outbound.routing import delivery_key
from engine.services.dispatcher import Dispatcher, control_id
from engine.services.normaliser import Processor, Source
from engine.store.outbox import Outbox
from engine.store.schema import deliveries, referral_events, referrals
from tests import loop_messages as lm
from tests.normalising import drain, open_, shipped, store


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def route(trigger: Trigger) -> tuple[Sequence[DeliveryRequest], Sequence[str]]:
    """Packets on creation, write-backs on booking, both to channel ``fake``."""
    kind = {Event.REFERRAL_CREATED: "packet", Event.APPOINTMENT_BOOKED: "writeback"}.get(
        trigger.event.type
    )
    if kind is None:
        return (), ()
    key = delivery_key(trigger.event.id, f"test-{kind}", "0")
    return (DeliveryRequest(key, f"test-{kind}", kind, "fake", "json.event"),), ()


@pytest.fixture
def engine(upgraded_url: str) -> Iterator[Engine]:
    eng = open_(upgraded_url)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def normalise(engine: Engine, payloads: Sequence[bytes], clock: Clock) -> None:
    store(engine, payloads, at=clock.now)
    mapping_set = shipped()
    proc = Processor(
        engine, lambda: mapping_set, {"test": Source()}, clock=clock, router=lambda: route
    )
    try:
        drain(proc)
    finally:
        proc.close()


def dispatcher(
    engine: Engine,
    channel: FakeChannel,
    clock: Clock,
    *,
    renderers: Mapping[str, Renderer] | None = None,
    render_processes: int = 0,
    **settings: Any,
) -> Dispatcher:
    cfg = FakeSettings(type="fake", backoff_initial_seconds=10, backoff_max_seconds=60, **settings)
    return Dispatcher(
        engine,
        {"fake": (channel, cfg)},
        renderers if renderers is not None else {"json.event": render_event},
        lambda _id: None,
        OutboundConfig(poll_seconds=0.05, lease_seconds=60),
        Metrics(),
        clock=clock,
        render_processes=render_processes,
    )


async def run_until(d: Dispatcher, check: Any, timeout: float = 10.0) -> None:
    """Run the dispatcher until ``check()`` holds (a condition, not a sleep)."""
    d.start()
    try:
        async with asyncio.timeout(timeout):
            while not check():
                d.wake_threadsafe()
                await asyncio.sleep(0.02)
        await d.idle()
    finally:
        await d.stop()


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(deliveries).order_by(deliveries.c.id)))


def events(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [
            t
            for (t,) in conn.execute(
                select(referral_events.c.type).order_by(
                    referral_events.c.referral_id, referral_events.c.sequence
                )
            )
        ]


def state(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(referrals.c.state)).scalar_one())


def test_the_order_enqueues_its_packet_in_the_same_transaction(
    engine: Engine, clock: Clock
) -> None:
    normalise(engine, [lm.orm("O1", "P100")], clock)
    [row] = rows(engine)
    assert (row.status, row.kind, row.channel, row.format, row.attempts) == (
        "pending",
        "packet",
        "fake",
        "json.event",
        0,
    )
    with engine.connect() as conn:
        trigger = conn.execute(select(referral_events.c.id, referral_events.c.type)).one()
    assert row.event_id == trigger.id
    assert trigger.type == "referral.created"


def test_replaying_the_message_enqueues_nothing_twice(engine: Engine, clock: Clock) -> None:
    normalise(engine, [lm.orm("O1", "P100")], clock)
    normalise(engine, [lm.orm("O1", "P100")], clock)  # the same message resent: a duplicate
    assert len(rows(engine)) == 1


async def test_a_packet_delivered_sends_the_referral(engine: Engine, clock: Clock) -> None:
    normalise(engine, [lm.orm("O1", "P100")], clock)
    channel = FakeChannel("fake")
    channel.play([Receipt(peer_reference="MSG1", detail="ACK AA")])
    d = dispatcher(engine, channel, clock)
    await run_until(d, lambda: rows(engine)[0].status != "pending" and not d._attempts)
    [row] = rows(engine)
    assert row.status == "delivered"
    assert row.attempts == 1
    assert '"peer_reference": "MSG1"' in row.receipt
    assert events(engine) == ["referral.created", "referral.sent", "referral.delivered"]
    assert state(engine) == "sent"
    [envelope] = channel.sent
    assert envelope.idempotency_key == row.key
    assert envelope.metadata["control_id"] == control_id(row.key)
    assert envelope.content_type == "application/json"
    assert row.payload == envelope.payload  # rendered once, kept for retries


async def test_an_unconfirmed_receipt_is_sent_but_not_delivered(
    engine: Engine, clock: Clock
) -> None:
    normalise(engine, [lm.orm("O1", "P100")], clock)
    channel = FakeChannel("fake")
    channel.play([Receipt(detail="250 queued", confirmed=False)])
    d = dispatcher(engine, channel, clock)
    await run_until(d, lambda: rows(engine)[0].status != "pending" and not d._attempts)
    assert rows(engine)[0].status == "sent"
    assert events(engine) == ["referral.created", "referral.sent"]


async def test_a_retryable_failure_waits_its_backoff_then_the_same_bytes_go_again(
    engine: Engine, clock: Clock
) -> None:
    normalise(engine, [lm.orm("O1", "P100")], clock)
    channel = FakeChannel("fake")
    channel.play([RetryableError("peer down")])
    d = dispatcher(engine, channel, clock)
    await run_until(d, lambda: len(channel.sent) == 1 and not d._attempts)
    [row] = rows(engine)
    assert row.status == "pending"
    assert row.last_error == "peer down"
    wait = (row.next_attempt_at.replace(tzinfo=UTC) - clock.now).total_seconds()
    assert 5 <= wait <= 10  # half to all of the 10 s initial backoff
    assert events(engine) == ["referral.created"]  # a retry is not an event

    d = dispatcher(engine, channel, clock)
    clock.advance(11)
    await run_until(d, lambda: rows(engine)[0].status == "delivered")
    assert [e.payload for e in channel.sent] == [channel.sent[0].payload] * 2
    assert [e.attempt for e in channel.sent] == [1, 2]
    assert rows(engine)[0].attempts == 2


async def test_retry_after_from_the_peer_is_honoured(engine: Engine, clock: Clock) -> None:
    normalise(engine, [lm.orm("O1", "P100")], clock)
    channel = FakeChannel("fake")
    channel.play([RetryableError("HTTP 429", retry_after=50)])
    d = dispatcher(engine, channel, clock)
    await run_until(d, lambda: len(channel.sent) == 1 and not d._attempts)
    row = rows(engine)[0]
    assert (row.next_attempt_at.replace(tzinfo=UTC) - clock.now).total_seconds() == 50


async def test_a_permanent_failure_is_dead_lettered_with_an_event_and_can_be_retried(
    engine: Engine, clock: Clock
) -> None:
    normalise(engine, [lm.orm("O1", "P100")], clock)
    channel = FakeChannel("fake")
    channel.play([PermanentError("ACK AR (ERR-3 207)")])
    d = dispatcher(engine, channel, clock)
    await run_until(d, lambda: rows(engine)[0].status == "dead" and not d._attempts)
    assert rows(engine)[0].last_error == "ACK AR (ERR-3 207)"
    assert events(engine) == ["referral.created", "delivery.failed"]
    assert state(engine) == "created"  # a failed delivery does not move the referral

    raw = engine.raw_connection()
    try:
        assert Outbox(raw.driver_connection, engine.dialect.name).retry(None, clock.now) == [1]
    finally:
        raw.close()
    d = dispatcher(engine, channel, clock)
    await run_until(d, lambda: rows(engine)[0].status == "delivered")
    assert events(engine)[-2:] == ["referral.sent", "referral.delivered"]


async def test_max_attempts_dead_letters(engine: Engine, clock: Clock) -> None:
    normalise(engine, [lm.orm("O1", "P100")], clock)
    channel = FakeChannel("fake")
    channel.play([RetryableError("peer down")] * 2)
    d = dispatcher(engine, channel, clock, max_attempts=2)
    await run_until(d, lambda: len(channel.sent) == 1 and not d._attempts)
    clock.advance(3600)
    d = dispatcher(engine, channel, clock, max_attempts=2)
    await run_until(d, lambda: rows(engine)[0].status == "dead" and not d._attempts)
    assert "gave up after 2 attempts" in rows(engine)[0].last_error


async def test_a_payload_that_cannot_be_built_is_dead_before_anything_is_sent(
    engine: Engine, clock: Clock
) -> None:
    from engine.outbound.model import PacketContext, Rendered, RenderError

    def broken(ctx: PacketContext) -> Rendered:
        raise RenderError("PID-3: no patient identifier")

    normalise(engine, [lm.orm("O1", "P100")], clock)
    channel = FakeChannel("fake")
    d = dispatcher(engine, channel, clock, renderers={"json.event": broken})
    await run_until(d, lambda: rows(engine)[0].status == "dead" and not d._attempts)
    assert channel.sent == []
    assert rows(engine)[0].last_error == "payload not built: PID-3: no patient identifier"


async def test_per_referral_order_holds_while_an_earlier_delivery_retries(
    engine: Engine, clock: Clock
) -> None:
    # The order and its booking: a packet, then a write-back, same referral, same channel.
    normalise(engine, [lm.orm("O1", "P100"), lm.siu("S1", "P100")], clock)
    assert [r.kind for r in rows(engine)] == ["packet", "writeback"]
    channel = FakeChannel("fake")
    channel.play([RetryableError("peer down")])
    d = dispatcher(engine, channel, clock)
    await run_until(d, lambda: len(channel.sent) == 1 and not d._attempts)
    assert [r.status for r in rows(engine)] == ["pending", "pending"]
    assert [e.kind for e in channel.sent] == ["packet"]  # the write-back did not overtake

    clock.advance(3600)
    d = dispatcher(engine, channel, clock)
    await run_until(d, lambda: [r.status for r in rows(engine)] == ["delivered"] * 2)
    assert [e.kind for e in channel.sent] == ["packet", "packet", "writeback"]
    assert events(engine)[-1] == "delivery.succeeded"


async def test_other_referrals_are_not_held_by_one_that_retries(
    engine: Engine, clock: Clock
) -> None:
    normalise(engine, [lm.orm("O1", "P100"), lm.orm("O2", "P200", mrn="200002")], clock)
    channel = FakeChannel("fake")
    channel.play([RetryableError("peer down")])
    d = dispatcher(engine, channel, clock, max_in_flight=1)
    await run_until(d, lambda: len(channel.sent) == 2 and not d._attempts)
    assert sorted(r.status for r in rows(engine)) == ["delivered", "pending"]


async def test_a_stalled_in_flight_delivery_is_reclaimed_and_sent_once_more(
    engine: Engine, clock: Clock
) -> None:
    normalise(engine, [lm.orm("O1", "P100")], clock)
    raw = engine.raw_connection()
    try:
        ob = Outbox(raw.driver_connection, engine.dialect.name)
        [claimed] = ob.claim(clock.now, "crashed-worker", 10, ["fake"])
        assert claimed.status == "in_flight"
        assert claimed.attempts == 1
        assert ob.claim(clock.now, "other", 10, ["fake"]) == []  # held by its claimer
    finally:
        raw.close()
    clock.advance(120)  # past the 60 s lease
    channel = FakeChannel("fake")
    d = dispatcher(engine, channel, clock)
    await run_until(d, lambda: rows(engine)[0].status == "delivered")
    assert rows(engine)[0].attempts == 2


async def test_a_delivery_for_a_channel_no_longer_configured_waits(
    engine: Engine, clock: Clock
) -> None:
    normalise(engine, [lm.orm("O1", "P100")], clock)
    with engine.begin() as conn:
        conn.execute(deliveries.update().values(channel="gone"))
    channel = FakeChannel("fake")
    d = dispatcher(engine, channel, clock)
    await run_until(d, lambda: True)
    # Claiming looks at configured channels only: the row waits, nothing is lost.
    assert rows(engine)[0].status == "pending"
    assert channel.sent == []


@pytest.mark.postgres
async def test_two_dispatchers_on_one_postgres_deliver_each_packet_once(
    pg_upgraded: str, clock: Clock
) -> None:
    eng = open_(pg_upgraded)
    try:
        normalise(eng, [lm.orm(f"O{i}", f"P{i}", mrn=f"3{i:05d}") for i in range(20)], clock)
        a, b = FakeChannel("fake"), FakeChannel("fake")
        da, db = dispatcher(eng, a, clock), dispatcher(eng, b, clock)
        da.start()
        db.start()
        try:
            async with asyncio.timeout(20):
                while any(r.status != "delivered" for r in rows(eng)):
                    await asyncio.sleep(0.05)
        finally:
            await da.stop()
            await db.stop()
        keys = [e.idempotency_key for e in (*a.sent, *b.sent)]
        assert len(keys) == 20 == len(set(keys))
    finally:
        eng.dispose()


def test_party_defaults_name_refloop() -> None:
    assert Party().application == "REFLOOP"


async def test_packets_render_in_a_render_process(engine: Engine, clock: Clock) -> None:
    from engine.outbound.packets.registry import renderers

    normalise(engine, [lm.orm("O1", "P100")], clock)
    channel = FakeChannel("fake")
    d = dispatcher(engine, channel, clock, renderers=renderers(), render_processes=1)
    await run_until(d, lambda: rows(engine)[0].status == "delivered")
    [envelope] = channel.sent
    assert envelope.payload == rows(engine)[0].payload
    assert b'"type":"referral.created"' in envelope.payload


async def test_a_render_error_in_the_render_process_dead_letters_with_its_reason(
    engine: Engine, clock: Clock
) -> None:
    from engine.outbound.packets.registry import renderers

    normalise(engine, [lm.orm("O1", "P100")], clock)
    # Status write-back of a referral still `created` has no ORC-5 to send: a RenderError
    # raised in the worker process, carried back with its reason.
    with engine.begin() as conn:
        conn.execute(deliveries.update().values(format="hl7v2.orm_status"))
    channel = FakeChannel("fake")
    d = dispatcher(engine, channel, clock, renderers=renderers(), render_processes=1)
    await run_until(d, lambda: rows(engine)[0].status == "dead" and not d._attempts)
    assert channel.sent == []
    assert rows(engine)[0].last_error.startswith("payload not built: ")
