"""The group-commit writer on its own: lanes, shutdown, poison rows."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from engine.metrics import Metrics
from engine.services.intake import Policy, ack_for, assess, record
from engine.services.writer import GroupCommitWriter, StorageUnavailable
from engine.store.database import open_engine
from engine.store.schema import messages
from tests.helpers import msg

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
WINDOW = timedelta(days=7)


def row_for(payload: bytes) -> dict:
    intake = assess(payload, Policy())
    answer = ack_for(intake, "auto", control_id="ACK1", now=NOW)
    return record(intake, payload=payload, listener="t", peer="p", received_at=NOW, answer=answer)


async def test_lanes_commit_everything_and_all_stop(upgraded_url):
    engine = open_engine(upgraded_url)
    writer = GroupCommitWriter(engine, Metrics(), max_batch=8, lanes=3)
    writer.start()
    try:
        stored = await asyncio.gather(
            *(writer.store(row_for(msg(f"W{i}")), WINDOW) for i in range(60))
        )
    finally:
        await asyncio.to_thread(writer.stop, 20)
    threads = writer._threads
    assert threads == []
    assert len({s.message_id for s in stored}) == 60
    with engine.connect() as conn:
        ids = {r.control_id for r in conn.execute(select(messages.c.control_id))}
    engine.dispose()
    assert ids == {f"W{i}" for i in range(60)}


async def test_stop_joins_every_lane_even_when_one_drains_the_queue(upgraded_url):
    engine = open_engine(upgraded_url)
    writer = GroupCommitWriter(engine, Metrics(), lanes=4)
    writer.start()
    started = list(writer._threads)
    await asyncio.to_thread(writer.stop, 20)
    engine.dispose()
    assert all(not t.is_alive() for t in started)


async def test_a_poison_row_fails_alone(upgraded_url):
    engine = open_engine(upgraded_url)
    writer = GroupCommitWriter(engine, Metrics(), lanes=1)
    writer.start()
    poison = row_for(msg("BAD"))
    poison["status"] = None  # violates NOT NULL: the database refuses this row only
    try:
        results = await asyncio.gather(
            writer.store(row_for(msg("OK1")), WINDOW),
            writer.store(poison, WINDOW),
            writer.store(row_for(msg("OK2")), WINDOW),
            return_exceptions=True,
        )
    finally:
        await asyncio.to_thread(writer.stop, 20)
    with engine.connect() as conn:
        ids = {r.control_id for r in conn.execute(select(messages.c.control_id))}
    engine.dispose()
    assert isinstance(results[1], StorageUnavailable)
    assert ids == {"OK1", "OK2"}
