"""Shared test support: configs, free ports, waiting on conditions, raw MLLP I/O."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from engine.config import Config, parse_config
from engine.protocol.mllp import Frame, FrameDecoder, encode

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpus" / "hl7v2"
BENCH_MESSAGES = SHARED / "bench" / "messages"
REFLOOP = REPO / ".venv" / "bin" / "refloop"
# The shipped mapping set; REFLOOP_TEST_MAPPINGS points the suite at another copy.
MAPPINGS = Path(os.environ.get("REFLOOP_TEST_MAPPINGS") or REPO / "mappings")


#: Statuses of an accepted message: ``received`` until the normaliser has decided.
ACCEPTED = frozenset({"received", "processed", "ignored", "mapping_error", "parked", "unmatched"})


def ingest_status(status: str) -> str:
    """The status ingest gave a row (normalisation later moves ``received`` on)."""
    return "received" if status in ACCEPTED else status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(
    database_url: str,
    *,
    listeners: list[dict[str, Any]] | None = None,
    http_port: int = 0,
    source: Path | None = None,
    **sections: Any,
) -> Config:
    # The shipped mapping set, wherever the test runs from.
    sections.setdefault("mappings", {"dir": str(MAPPINGS)})
    # In-process daemons normalise in a thread: spawning a normaliser process costs a
    # second per start. The separate process is tested on its own (and by every e2e
    # test, which runs the real daemon with its defaults).
    sections["normalizer"] = {"separate_process": False, **sections.get("normalizer", {})}
    data: dict[str, Any] = {
        "database": {"url": database_url},
        "http": {"host": "127.0.0.1", "port": http_port},
        "mllp": {
            "listeners": listeners
            if listeners is not None
            else [{"name": "test", "host": "127.0.0.1", "port": 0}]
        },
        **sections,
    }
    return parse_config(data, source or Path("test.toml"))


def msg(
    control_id: str = "CTRL1",
    *,
    mtype: str = "ORM^O01^ORM_O01",
    version: str = "2.5.1",
    msh15: str = "",
    msh16: str = "",
    charset: str = "",
    body: str = "PID|1||12345^^^HOSP^MR||TESTPATIENT^ALPHA\rORC|NW|PLC1\r",
    sender: str = "EHR",
    facility: str = "CLINIC",
    timestamp: str = "20261123101500",
    term: str = "\r",
    encoding: str = "utf-8",
) -> bytes:
    """A small synthetic HL7 v2 message (synthetic data only).

    ``body`` is written with CR between segments; ``term`` replaces every CR.
    """
    msh = (
        f"MSH|^~\\&|{sender}|{facility}|REFLOOP|HUB|{timestamp}||{mtype}|{control_id}|P"
        f"|{version}|||{msh15}|{msh16}||{charset}"
    )
    return (msh + term + body.replace("\r", term)).encode(encoding)


async def wait_for(
    condition: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def wait_until(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)


class RawMllp:
    """A raw socket peer: send arbitrary bytes, read whole ACK frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.frames: list[bytes] = []

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", **kw: Any) -> RawMllp:
        reader, writer = await asyncio.open_connection(host, port, **kw)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, payload: bytes) -> bytes:
        await self.send_raw(encode(payload))
        return await self.read_frame()

    async def read_frame(self, timeout: float = 10.0) -> bytes:
        async def _read() -> bytes:
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed by peer")
                self.frames += [e.payload for e in self.decoder.feed(data) if isinstance(e, Frame)]
            return self.frames.pop(0)

        return await asyncio.wait_for(_read(), timeout)

    async def closed(self, timeout: float = 10.0) -> bool:
        """True once the peer has closed the connection."""

        async def _eof() -> bool:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return True

        try:
            return await asyncio.wait_for(_eof(), timeout)
        except (ConnectionResetError, BrokenPipeError):
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def segments(ack: bytes) -> dict[str, list[str]]:
    """ACK segments by name → fields (split on |)."""
    out: dict[str, list[str]] = {}
    for seg in ack.decode("latin-1").split("\r"):
        if seg:
            fields = seg.split("|")
            out[fields[0]] = fields
    return out


def pg_url() -> str:
    return os.environ.get("REFLOOP_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


class QuietServer(uvicorn.Server):
    """uvicorn in the test's event loop, leaving signal handling to pytest."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[int]:
    """Serve ``app`` on a loopback port for the block; yields the port."""
    server = QuietServer(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False)
    )
    sock = socket.create_server(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_for(lambda: server.started or task.done())
        if task.done():
            task.result()
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
