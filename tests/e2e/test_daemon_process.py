"""Whole-daemon acceptance tests: ``refloop run`` as a subprocess, real sockets."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from engine.protocol.mllp import Frame, FrameDecoder, encode
from tests.e2e.daemon_process import DaemonProcess, upgrade, write_config
from tests.helpers import REFLOOP, msg, segments, wait_until

pytestmark = pytest.mark.slow


def stored_control_ids(config) -> set[str]:
    out = subprocess.run(
        [str(REFLOOP), "messages", "list", "--json", "--config", str(config)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return {json.loads(line)["control_id"] for line in out.splitlines()}


class Sender(threading.Thread):
    """A blocking MLLP client that records every control id answered AA."""

    def __init__(self, port: int, tag: str) -> None:
        super().__init__(daemon=True)
        self.port, self.tag = port, tag
        self.acked: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                self._loop(sock)
        except OSError:
            return

    def _loop(self, sock: socket.socket) -> None:
        decoder = FrameDecoder()
        n = 0
        while not self.stop.is_set():
            cid = f"{self.tag}-{n}"
            sock.sendall(encode(msg(cid)))
            frames: list[bytes] = []
            while not frames:
                data = sock.recv(65536)
                if not data:
                    return
                frames = [e.payload for e in decoder.feed(data) if isinstance(e, Frame)]
            msa = segments(frames[0])["MSA"]
            if msa[1] == "AA" and msa[2] == cid:
                self.acked.append(cid)
            n += 1


def test_kill_9_loses_no_acknowledged_message(tmp_path, database_url):
    config, port, http_port = write_config(tmp_path, database_url)
    upgrade(config)
    daemon = DaemonProcess(config, http_port).start()
    try:
        senders = [Sender(port, f"K{i}") for i in range(4)]
        for s in senders:
            s.start()
        wait_until(lambda: sum(len(s.acked) for s in senders) >= 300)
        daemon.kill()  # SIGKILL: no shutdown code runs
        for s in senders:
            s.stop.set()
            s.join(10)
        acked = {cid for s in senders for cid in s.acked}
        restarted = DaemonProcess(config, http_port).start()
        try:
            stored = stored_control_ids(config)
        finally:
            assert restarted.terminate() == 0
    finally:
        daemon.stop_quietly()
    assert len(acked) >= 300
    assert acked <= stored, f"{len(acked - stored)} acknowledged messages are missing"


@pytest.mark.parametrize("signum", [15, 2], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_finishes_in_flight_messages_and_exits_cleanly(tmp_path, sqlite_url, signum):
    config, port, http_port = write_config(tmp_path, sqlite_url)
    daemon = DaemonProcess(config, http_port).start()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"".join(encode(msg(f"T{i}")) for i in range(50)))
        decoder = FrameDecoder()
        answered: list[str] = []
        data = sock.recv(65536)  # the first ACKs: the daemon is mid-stream now
        assert daemon.proc is not None
        daemon.proc.send_signal(signum)
        while data:
            for e in decoder.feed(data):
                if isinstance(e, Frame):
                    answered.append(segments(e.payload)["MSA"][2])
            data = sock.recv(65536)
        sock.close()
        code = daemon.proc.wait(60)
    finally:
        daemon.stop_quietly()
    assert code == 0
    assert answered  # in flight when the signal came, and still answered
    # Whatever was answered was stored; the rest was never read, so the sender keeps it.
    assert set(answered) <= stored_control_ids(config)
    assert answered == [f"T{i}" for i in range(len(answered))]
    assert '"event": "daemon.stopped"' in daemon.logs()


def test_no_phi_in_any_log_line(tmp_path, sqlite_url):
    name, mrn, dob = "ZZPHISURNAME", "MRNPHI4242", "19010203"
    body = f"PID|1||{mrn}^^^HOSP^MR||{name}^QUUXGIVEN||{dob}|F\rORC|NW|PLC9\r"
    config, port, http_port = write_config(tmp_path, sqlite_url)
    daemon = DaemonProcess(config, http_port, log_level="debug").start()
    try:
        files = []
        for i, payload in enumerate(
            [
                msg("PHI1", body=body),
                msg("PHI1", body=body),  # duplicate
                msg("PHI2", body=body).replace(b"PID|", b"PID|\xff", 1),  # undecodable
                msg("PHI3", mtype="QQQ^Q99", body=body),  # unknown type
                body.encode(),  # no MSH at all
                msg("PHI4", body=body, charset="NOT-A-CHARSET"),
            ]
        ):
            f = tmp_path / f"m{i}.hl7"
            f.write_bytes(payload)
            files.append(str(f))
        for f in files:
            subprocess.run(
                [str(REFLOOP), "send", f, "--port", str(port)], capture_output=True, check=False
            )
        wait_until(lambda: len(stored_control_ids(config)) >= 5)
        assert daemon.terminate() == 0
    finally:
        daemon.stop_quietly()
    lines = daemon.logs().splitlines()
    assert any('"mllp.message.stored"' in line for line in lines)
    assert any('"mllp.message.refused"' in line for line in lines)
    for line in lines:
        for secret in (name, mrn, dob, "QUUXGIVEN"):
            assert secret not in line, f"PHI {secret!r} leaked into a log line"


def test_run_refuses_an_outdated_schema_and_names_the_fix(tmp_path, postgres_url):
    config, _, _ = write_config(tmp_path, postgres_url)
    started = time.monotonic()
    result = subprocess.run(
        [str(REFLOOP), "run", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "refloop db upgrade" in result.stderr
    assert time.monotonic() - started < 30
    upgrade = subprocess.run(
        [str(REFLOOP), "db", "upgrade", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "upgraded" in upgrade.stdout


def test_embedded_sqlite_upgrades_itself_unless_told_not_to(tmp_path):
    url = f"sqlite:///{tmp_path}/fresh.db"
    config, _, http_port = write_config(tmp_path, url)
    text = config.read_text().replace("[database]\n", "[database]\nauto_upgrade = false\n")
    config.write_text(text)
    refused = subprocess.run(
        [str(REFLOOP), "run", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert "refloop db upgrade" in refused.stderr
    config.write_text(text.replace("auto_upgrade = false\n", ""))
    daemon = DaemonProcess(config, http_port).start()
    assert daemon.terminate() == 0
    assert '"event": "db.upgraded"' in daemon.logs()


def test_sigterm_while_a_sender_keeps_pipelining_drains_promptly(tmp_path, sqlite_url):
    config, port, http_port = write_config(tmp_path, sqlite_url)
    daemon = DaemonProcess(config, http_port).start()
    stop = threading.Event()
    answered: list[str] = []

    def pipeline(sock: socket.socket) -> None:
        n = 0
        try:
            while not stop.is_set():
                sock.sendall(b"".join(encode(msg(f"PL{n + i}")) for i in range(20)))
                n += 20
        except OSError:
            return

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            writer = threading.Thread(target=pipeline, args=(sock,), daemon=True)
            writer.start()
            decoder = FrameDecoder()
            while len(answered) < 100:
                for e in decoder.feed(sock.recv(65536)):
                    if isinstance(e, Frame):
                        answered.append(segments(e.payload)["MSA"][2])
            assert daemon.proc is not None
            daemon.proc.send_signal(15)
            code = daemon.proc.wait(20)  # well inside the 30 s drain bound
            stop.set()
            try:
                while data := sock.recv(65536):
                    answered += [
                        segments(e.payload)["MSA"][2]
                        for e in decoder.feed(data)
                        if isinstance(e, Frame)
                    ]
            except OSError:
                pass
            writer.join(10)
    finally:
        stop.set()
        daemon.stop_quietly()
    assert code == 0
    assert answered == [f"PL{i}" for i in range(len(answered))]
    assert set(answered) <= stored_control_ids(config)
    assert "mllp.frame.failed" not in daemon.logs()
    assert "mllp.drain.timeout" not in daemon.logs()


def _children(pid: int) -> list[int]:
    """The daemon's child processes: the normaliser (and multiprocessing's resource
    tracker, which also exits with its parent)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _normaliser(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(child)
        except FileNotFoundError:
            continue
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_the_normaliser_process_never_outlives_the_daemon(tmp_path, sqlite_url):
    """The normaliser runs as the daemon's child (the default); SIGTERM stops both, and
    after kill -9 of the daemon the orphan sees its pipe close and exits on its own."""
    config, _port, http_port = write_config(tmp_path, sqlite_url)
    upgrade(config)
    daemon = DaemonProcess(config, http_port).start()
    try:
        assert daemon.proc is not None
        wait_until(lambda: len(_normaliser(daemon.proc.pid)) == 1, timeout=30)
        children = _children(daemon.proc.pid)
        assert daemon.terminate() == 0
        wait_until(lambda: all(_gone(c) for c in children), timeout=30)
        daemon = DaemonProcess(config, http_port).start()
        assert daemon.proc is not None
        wait_until(lambda: len(_normaliser(daemon.proc.pid)) == 1, timeout=30)
        children = _children(daemon.proc.pid)
        daemon.kill()
        wait_until(lambda: all(_gone(c) for c in children), timeout=30)
    finally:
        daemon.stop_quietly()
