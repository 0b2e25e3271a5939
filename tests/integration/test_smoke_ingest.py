"""Store, then ACK: the basic path on both databases."""

from __future__ import annotations

from sqlalchemy import select

from engine.store.database import open_engine
from engine.store.schema import messages
from tests.conftest import running
from tests.helpers import RawMllp, ingest_status, msg, segments


async def test_message_is_stored_before_aa(config_for, upgraded_url):
    async with running(config_for()) as daemon:
        port = daemon.listeners[0].port
        peer = await RawMllp.connect(port)
        ack = await peer.send(msg("SMOKE1"))
        seen_at_ack = _rows(upgraded_url)
        await peer.close()
    seg = segments(ack)
    assert seg["MSA"][1:3] == ["AA", "SMOKE1"]
    assert [r.control_id for r in seen_at_ack] == ["SMOKE1"]
    assert seen_at_ack[0].raw == msg("SMOKE1")
    assert ingest_status(seen_at_ack[0].status) == "received"


def _rows(url):
    eng = open_engine(url)
    with eng.connect() as conn:
        rows = list(conn.execute(select(messages)))
    eng.dispose()
    return rows
