"""Support for normaliser tests: store messages the way ingest does, run the real
normaliser over them, and read back what the store holds."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from engine.config import ListenerConfig
from engine.edges.mllp_listener import policy_from
from engine.mapping.mapset import MappingSet, load_mapping_set
from engine.protocol.ack import next_control_id
from engine.services.intake import ack_for, assess, record
from engine.services.normaliser import Processor, Source
from engine.services.pipeline import Report
from engine.store.database import open_engine
from engine.store.ingest import IngestStore
from engine.store.schema import messages, referral_events, referral_keys, referrals
from tests.helpers import MAPPINGS

_SETS: dict[str, MappingSet] = {}


def shipped() -> MappingSet:
    """The shipped mapping set, loaded once per test session."""
    key = str(MAPPINGS)
    if key not in _SETS:
        _SETS[key] = load_mapping_set(MAPPINGS)
    return _SETS[key]


def store(engine: Engine, payloads: Sequence[bytes], *, at: datetime | None = None) -> list[int]:
    """Commit messages exactly as the listener's writer would; returns their ids."""
    policy = policy_from(ListenerConfig(name="test", port=0))
    now = at or datetime.now(UTC)
    rows = []
    for payload in payloads:
        intake = assess(payload, policy)
        answer = ack_for(intake, policy.ack_mode, control_id=next_control_id(), now=now)
        rows.append(
            record(
                intake,
                payload=payload,
                listener="test",
                peer="127.0.0.1",
                received_at=now,
                answer=answer,
            )
        )
    raw = engine.raw_connection()
    try:
        written = IngestStore(raw.driver_connection, engine.dialect.name, _no_conflict).write(
            rows, [timedelta(days=7)] * len(rows)
        )
    finally:
        raw.close()
    return [w.message_id for w in written]


def _no_conflict(*_: Any) -> None:
    return None


def processor(
    engine: Engine,
    mapping_set: MappingSet | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
) -> Processor:
    chosen = mapping_set or shipped()
    return Processor(engine, lambda: chosen, {"test": Source()}, clock=clock)


def drain(proc: Processor, batch: int = 256) -> list[Report]:
    """Run the worker's loop body until nothing is ``received``."""
    reports: list[Report] = []
    while batch_ := proc.next_batch(batch):
        reports += proc.process(batch_)
    return reports


def open_(url: str) -> Engine:
    return open_engine(url)


def snapshot(engine: Engine) -> dict[str, Any]:
    """Everything normalisation produced, in a comparable form."""
    with engine.connect() as conn:
        refs = [dict(r._mapping) for r in conn.execute(select(referrals).order_by(referrals.c.id))]
        for r in refs:
            r["data"] = json.loads(r["data"])
        events = [
            dict(r._mapping)
            for r in conn.execute(
                select(referral_events).order_by(
                    referral_events.c.referral_id, referral_events.c.sequence
                )
            )
        ]
        keys = sorted(tuple(r) for r in conn.execute(select(referral_keys)))
        statuses = [
            tuple(r)
            for r in conn.execute(select(messages.c.id, messages.c.status).order_by(messages.c.id))
        ]
    return {"referrals": refs, "events": events, "keys": keys, "statuses": statuses}


def states(engine: Engine) -> dict[str | None, str]:
    """placer order number → state."""
    with engine.connect() as conn:
        return {
            r.placer_order_number: r.state
            for r in conn.execute(select(referrals.c.placer_order_number, referrals.c.state))
        }


def statuses(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [s for (s,) in conn.execute(select(messages.c.status).order_by(messages.c.id))]
