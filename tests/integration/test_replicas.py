"""Several refloop replicas on one PostgreSQL: a resend is recognised whichever replica
gets it (the partial unique index on dedup_key arbitrates)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from engine.protocol.mllp import encode
from engine.store.database import open_engine
from engine.store.schema import messages
from tests.conftest import running
from tests.helpers import RawMllp, ingest_status, make_config, msg, segments

pytestmark = pytest.mark.postgres


async def test_the_same_message_sent_to_two_replicas_at_once_is_stored_once(pg_upgraded):
    async with running(make_config(pg_upgraded)) as a, running(make_config(pg_upgraded)) as b:
        ports = [a.listeners[0].port, b.listeners[0].port]
        peers = [await RawMllp.connect(ports[i % 2]) for i in range(8)]
        for round_ in range(5):
            for p in peers:
                await p.send_raw(encode(msg(f"REPL{round_}")))
            acks = await asyncio.gather(*(p.read_frame() for p in peers))
            assert len(set(acks)) == 1, f"round {round_}: replicas answered differently"
            assert segments(acks[0])["MSA"][1:3] == ["AA", f"REPL{round_}"]
        for p in peers:
            await p.close()
    eng = open_engine(pg_upgraded)
    with eng.connect() as conn:
        rows = list(conn.execute(select(messages.c.control_id, messages.c.status)))
    eng.dispose()
    for round_ in range(5):
        statuses = sorted(ingest_status(s) for c, s in rows if c == f"REPL{round_}")
        assert statuses == ["duplicate"] * 7 + ["received"]
