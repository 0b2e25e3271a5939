"""The daemon killed in the middle of a delivery: after the restart it completes, and an
idempotent peer has it exactly once (at-least-once out, exactly-once in effect)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from sqlalchemy import select

from engine.protocol.mllp import Frame, FrameDecoder, encode
from engine.store.database import open_engine
from engine.store.schema import deliveries, referral_events
from tests.e2e.daemon_process import DaemonProcess, upgrade
from tests.helpers import MAPPINGS, free_port, segments, wait_until
from tests.loop_messages import orm
from tests.peers.mllp_peer import MllpPeer, Reply

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "closed-loop"


def write_config(directory: Path, url: str, specialist_port: int) -> tuple[Path, int, int]:
    mllp_port, http_port = free_port(), free_port()
    path = directory / "engine.toml"
    path.write_text(
        f"[database]\nurl = {json.dumps(url)}\n\n"
        f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n\n'
        f'[[mllp.listeners]]\nname = "ehr"\nhost = "127.0.0.1"\nport = {mllp_port}\n\n'
        f"[mappings]\ndir = {json.dumps(str(MAPPINGS))}\n\n"
        # A short lease: on PostgreSQL a row held by a dead daemon comes back after it
        # (on SQLite the restarted daemon takes back every in-flight row at once).
        f"[outbound]\ndir = {json.dumps(str(EXAMPLE))}\nlease_seconds = 12\n\n"
        f'[channels.specialist]\ntype = "mllp"\nport = {specialist_port}\n'
        "ack_timeout_seconds = 5\ntimeout_seconds = 5\n\n"
        f'[channels.ehr]\ntype = "mllp"\nport = {free_port()}\ntimeout_seconds = 5\n\n'
        '[logging]\nformat = "json"\n'
    )
    return path, mllp_port, http_port


def delivery_rows(url: str) -> list:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            return list(conn.execute(select(deliveries)))
    finally:
        eng.dispose()


def event_types(url: str) -> list[str]:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            return list(
                conn.execute(select(referral_events.c.type).order_by(referral_events.c.sequence))
                .scalars()
                .all()
            )
    finally:
        eng.dispose()


def send(port: int, payload: bytes) -> bytes:
    """One message over a plain socket, its ACK back (sync: the peer runs in a thread)."""
    decoder = FrameDecoder()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(encode(payload))
        while True:
            data = sock.recv(65536)
            assert data, "connection closed before the ACK"
            frames = [e for e in decoder.feed(data) if isinstance(e, Frame)]
            if frames:
                return frames[0].payload


def test_killed_mid_delivery_the_packet_arrives_exactly_once(tmp_path, database_url):
    # A peer in its own thread: the test below waits synchronously on the daemon.
    with MllpPeer.run_in_thread(idempotent=True) as peer:
        # The first packet is received but its ACK held back: the daemon dies waiting.
        peer.script(Reply(delay=120))
        config, port, http_port = write_config(tmp_path, database_url, peer.port)
        upgrade(config)
        daemon = DaemonProcess(config, http_port).start()
        try:
            ack = send(port, orm("CRASH-1", "CR100"))
            assert segments(ack)["MSA"][1] == "AA"
            peer.wait_for(1, timeout=30)
            assert [r.status for r in delivery_rows(database_url)] == ["in_flight"]
            daemon.kill()  # SIGKILL while the packet waits for its ACK
        finally:
            daemon.stop_quietly()

        restarted = DaemonProcess(config, http_port).start()
        try:
            wait_until(
                lambda: [r.status for r in delivery_rows(database_url)] == ["delivered"],
                timeout=60,
            )
        finally:
            assert restarted.terminate() == 0
        assert len(peer.arrivals) == 2  # sent again after the crash (at least once) …
        assert len(peer.messages) == 1  # … and the peer has it once (same MSH-10)
        assert peer.duplicates == 1
    [row] = delivery_rows(database_url)
    assert row.attempts == 2
    types = event_types(database_url)
    assert types.count("referral.sent") == 1
    assert types.count("referral.delivered") == 1
