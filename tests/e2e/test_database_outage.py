"""A real PostgreSQL outage under a running ``refloop run``: no mocks.

The daemon runs on a private cluster (tests/e2e/pg_cluster.py) which the test stops and
starts. While the database is gone every message must be rejected with ERR-3 207 at
once (never AA, never silence), /readyz must say so, and once the database is back the
same daemon process must accept again without a restart. At the end, the database
holds exactly the messages that were answered AA, once each.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from engine.protocol.mllp import Frame, FrameDecoder, encode
from tests.e2e.daemon_process import DaemonProcess, upgrade, write_config
from tests.e2e.pg_cluster import PgCluster, find_bindir, unavailable
from tests.helpers import ingest_status, msg, segments, wait_until

pytestmark = pytest.mark.slow

#: How long the daemon may take to answer one message while the database is down. Its
#: PostgreSQL connect_timeout is 5 s; a stopped server on loopback refuses at once.
ANSWER_BOUND_SECONDS = 10.0
PER_PHASE = 6


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    problem = unavailable()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires a private PostgreSQL cluster: {problem}", pytrace=False)
        pytest.skip(f"cannot start a private PostgreSQL cluster: {problem}")
    bindir = find_bindir()
    assert bindir is not None
    cluster = PgCluster(bindir)
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.destroy()


class Peer:
    """A blocking MLLP sender on one connection, as an EHR interface would be."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(ANSWER_BOUND_SECONDS + 5)
        self.decoder = FrameDecoder()
        self.frames: list[bytes] = []

    def send(self, control_id: str) -> tuple[str, str, float]:
        """(MSA-1, ERR-3.1 or "", seconds to the answer) for one message."""
        started = time.monotonic()
        self.sock.sendall(encode(msg(control_id)))
        while not self.frames:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"{control_id}: no answer (silence)") from None
            if not data:
                raise AssertionError(f"{control_id}: connection closed without an answer")
            self.frames += [e.payload for e in self.decoder.feed(data) if isinstance(e, Frame)]
        ack = segments(self.frames.pop(0))
        elapsed = time.monotonic() - started
        assert ack["MSA"][2] == control_id, f"answer for {ack['MSA'][2]}, sent {control_id}"
        err = ack["ERR"][3].split("^")[0] if "ERR" in ack and len(ack["ERR"]) > 3 else ""
        return ack["MSA"][1], err, elapsed

    def close(self) -> None:
        self.sock.close()


def readyz(http_port: int) -> tuple[int, dict[str, object]]:
    r = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=10)
    return r.status_code, r.json()


def storage_errors(http_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    return sum(
        float(m.group(1))
        for m in re.finditer(
            r'^refloop_mllp_messages_total\{[^}]*outcome="storage_error"[^}]*\} (\S+)$',
            text,
            re.M,
        )
    )


def stored(url: str) -> Counter[tuple[str, str]]:
    """(control_id, status) → how many rows."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT control_id, status FROM messages").fetchall()
    return Counter((str(cid), ingest_status(str(status))) for cid, status in rows)


@pytest.mark.parametrize("stop_mode", ["fast", "immediate"])
def test_database_outage_rejects_then_recovers_without_restart(
    tmp_path: Path, pg_cluster: PgCluster, stop_mode: str
) -> None:
    config, mllp_port, http_port = write_config(tmp_path, pg_cluster.url)
    upgrade(config)
    daemon = DaemonProcess(config, http_port).start()
    assert daemon.proc is not None
    acked: list[str] = []
    rejected: list[str] = []
    peer = Peer(mllp_port)
    try:
        # 1. Database up: accepted.
        for i in range(PER_PHASE):
            cid = f"UP-{i}"
            code, err, _ = peer.send(cid)
            assert (code, err) == ("AA", ""), f"{cid} before the outage: {code} {err}"
            acked.append(cid)

        # 2. Database down: every message rejected with 207, promptly, on the same
        #    connection and on a new one.
        pg_cluster.stop(stop_mode)
        late = Peer(mllp_port)
        try:
            for i in range(PER_PHASE):
                for who, p in (("old", peer), ("new", late)):
                    cid = f"DOWN-{who}-{i}"
                    code, err, elapsed = p.send(cid)
                    why = f"{cid} while the database is down: {code} ERR-3 {err!r}"
                    assert code in ("AR", "CR"), why
                    assert err == "207", why
                    assert elapsed < ANSWER_BOUND_SECONDS, f"{cid} answered after {elapsed:.1f}s"
                    rejected.append(cid)
        finally:
            late.close()
        body = wait_until(
            lambda: (r := readyz(http_port))[0] == 503 and r[1], timeout=ANSWER_BOUND_SECONDS
        )
        assert body["database"] == "unreachable", body
        assert storage_errors(http_port) == len(rejected)

        # 3. Database back: the same daemon process accepts the very next messages.
        pg_cluster.start()
        for i in range(PER_PHASE):
            cid = f"BACK-{i}"
            code, err, _ = peer.send(cid)
            assert (code, err) == ("AA", ""), (
                f"{cid}, the database being up again: {code} ERR-3 {err!r}\n{daemon.logs()}"
            )
            acked.append(cid)
        assert readyz(http_port) == (200, {**body, "status": "ready", "database": "ok"})
        assert daemon.proc.poll() is None, "the daemon exited during the outage"
        assert storage_errors(http_port) == len(rejected)
    finally:
        peer.close()
        try:
            exit_code = daemon.terminate(timeout=30)
        finally:
            daemon.stop_quietly()
    assert exit_code == 0, daemon.logs()

    # 4. Exactly what was answered AA is stored, once; nothing rejected is stored.
    rows = stored(pg_cluster.url)
    for cid in acked:
        assert rows[(cid, "received")] == 1, f"{cid} was ACKed AA; stored as {rows}"
    stored_ids = {cid for cid, _ in rows}
    assert not stored_ids & set(rejected), f"rejected yet stored: {stored_ids & set(rejected)}"
    assert sum(rows.values()) == len(acked), rows
    logs = daemon.logs()
    assert '"event": "ingest.commit.failed"' in logs
    assert '"event": "mllp.message.not_stored"' in logs


def test_first_message_after_an_idle_database_restart_is_accepted(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    config, mllp_port, http_port = write_config(tmp_path, pg_cluster.url)
    # One writer lane, so that the lane holding the stale connection surely gets the
    # next message (with the default two lanes each one rejects its first message).
    config.write_text(config.read_text() + "\n[ingest]\nwriters = 1\n")
    upgrade(config)
    daemon = DaemonProcess(config, http_port).start()
    peer = Peer(mllp_port)
    try:
        assert peer.send("IDLE-0")[:2] == ("AA", "")
        # The database restarts while no message is in flight: no outage is ever seen.
        pg_cluster.stop("fast")
        pg_cluster.start()
        assert readyz(http_port)[1]["database"] == "ok"
        code, err, _ = peer.send("IDLE-1")
        assert (code, err) == ("AA", ""), f"database up, yet answered {code} ERR-3 {err!r}"
    finally:
        peer.close()
        try:
            daemon.terminate(timeout=30)
        finally:
            daemon.stop_quietly()
