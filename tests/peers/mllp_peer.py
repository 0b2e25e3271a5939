"""A real MLLP peer for tests: python-hl7's asyncio server, scriptable ACKs, fault modes.

Use it from async tests as a context manager::

    async with MllpPeer() as peer:                      # 127.0.0.1, a free port
        ...send to peer.port...
        got = await peer.wait_for(2, timeout=5)         # the first two messages (bytes)

or from sync code (a daemon subprocess test) in a thread with its own event loop::

    with MllpPeer.run_in_thread(idempotent=True) as peer:   # a PeerThread
        ...point the daemon at peer.port...
        peer.wait_for(1, timeout=30)
    # (or call peer.stop() yourself)

What it does
------------
* Records every framed message it receives, as bytes (the payload, without the MLLP
  envelope), in arrival order: ``messages``.
  ``arrivals`` is every message including duplicates; ``log`` is the wire history as
  ``("recv" | "ack", MSH-10)`` pairs (``ack`` is logged as an answer is written), so a
  test can see whether a client waited for an ACK before sending the next message.
* Answers each message with an original-mode ACK built by python-hl7 (``create_ack``):
  MSA-1 is ``default.code`` (``"AA"``), or what :meth:`MllpPeer.script` queued for the
  next messages, one :class:`Reply` per message. A reply may add an ERR-3 code and an
  MSA-3 text (to prove a client never quotes it), delay the answer, or misbehave: see
  :class:`Fault`.
* **Idempotent mode** (``idempotent=True``) remembers MSH-10s: a repeated control id is
  not added to ``messages`` again (it is still in ``arrivals``, and counted in
  ``duplicates``) and is answered AA without consuming the script, as a receiver that
  deduplicates would. "Delivered exactly once" is then ``len(peer.messages) == 1``.
* ``tls=`` takes a server :class:`ssl.SSLContext`; :func:`server_tls` builds one from
  tests/integration/certs.py files (``client_ca=`` makes it require client certificates:
  mutual TLS; ``max_version=`` pins TLS 1.2 or 1.3).
* :meth:`MllpPeer.stop` then :meth:`MllpPeer.start` restarts it on the same port,
  keeping what it recorded: the "peer restarted" case.
* ``connections`` counts accepted connections; ``open_connections`` those still open.

Each connection has a reader task that records at arrival and a responder that answers
in order; a delayed or silent answer therefore never hides a client that pipelines.
Everything is stopped and awaited on exit: no task, thread or socket outlives the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any

import hl7
from hl7.mllp import start_hl7_server


class Fault(Enum):
    """How a reply misbehaves."""

    WRONG_CONTROL_ID = "wrong_control_id"  # a well-formed ACK whose MSA-2 is another id
    GARBAGE = "garbage"  # unframed bytes, connection kept open
    NOT_ACK = "not_ack"  # a well-framed payload that is not an ACK
    SILENT = "silent"  # never answer (keep reading)
    HALF_FRAME = "half_frame"  # send half the ACK frame, then close
    CLOSE = "close"  # close the connection without answering


@dataclass(frozen=True)
class Reply:
    code: str = "AA"  # MSA-1: AA AE AR CA CE CR, or anything
    error_code: str = ""  # ERR-3.1 (table 0357), e.g. "207"
    text: str = ""  # MSA-3 free text (clients must never quote it)
    delay: float = 0.0  # seconds before answering
    fault: Fault | None = None


GARBAGE = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"


def _control_id(message: hl7.Message | None) -> str:
    if message is None:
        return ""
    try:
        return str(message.segment("MSH")(10))
    except (KeyError, IndexError):
        return ""


def _parse(raw: bytes) -> hl7.Message | None:
    try:
        return hl7.parse(raw.decode("latin-1"))
    except Exception:  # a peer must survive anything a client sends
        return None


def build_ack(message: hl7.Message | None, reply: Reply) -> bytes:
    """The ACK payload (no framing) for ``message`` as ``reply`` asks."""
    if message is None:
        return f"MSH|^~\\&|PEER||||||ACK|PEERACK|P|2.5.1\rMSA|{reply.code}|".encode()
    ack = message.create_ack(ack_code=reply.code, message_id="PEERACK")
    msa = ack.segment("MSA")
    if reply.text:
        msa.assign_field(reply.text, 3)
    if reply.fault is Fault.WRONG_CONTROL_ID:
        msa.assign_field(f"NOT{_control_id(message)}", 2)
    text = str(ack)
    if reply.error_code:
        text += f"\rERR|||{reply.error_code}^Application internal error^HL70357|E"
    return text.encode("latin-1")


@dataclass(eq=False)
class _Conn:
    writer: Any
    queue: asyncio.Queue[tuple[hl7.Message | None, Reply]] = field(default_factory=asyncio.Queue)


class MllpPeer:
    """An MLLP listener on loopback that records and answers (see the module doc)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: ssl.SSLContext | None = None,
        idempotent: bool = False,
        default: Reply | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.idempotent = idempotent
        self.default = default or Reply()
        self.messages: list[bytes] = []
        self.arrivals: list[bytes] = []
        self.log: list[tuple[str, str]] = []
        self.duplicates = 0
        self.connections = 0
        self.open_connections = 0
        self._seen: set[str] = set()
        self._script: deque[Reply] = deque()
        self._lock = threading.Condition()  # guards state read from other threads
        self._changed: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()

    # -- control --------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Answer the next messages with these replies, in order, then ``default``."""
        with self._lock:
            self._script.extend(replies)

    async def start(self) -> MllpPeer:
        self._changed = asyncio.Event()
        self._server = await start_hl7_server(
            self._accept, host=self.host, port=self.port, ssl=self.tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening, close every connection, and wait for all of it."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MllpPeer:
        return await self.start()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def wait_until(self, condition: Callable[[], object], timeout: float = 5.0) -> None:
        """Wait until ``condition()`` is true; re-checked whenever the peer's state changes."""
        assert self._changed is not None, "start the peer first"
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[bytes]:
        """The first ``n`` recorded messages, once there are that many."""
        try:
            await self.wait_until(lambda: len(self.messages) >= n, timeout)
        except TimeoutError:
            raise AssertionError(
                f"peer got {len(self.messages)} message(s) within {timeout}s, expected {n}"
            ) from None
        return list(self.messages[:n])

    @classmethod
    def run_in_thread(cls, **kwargs: Any) -> PeerThread:
        """Start a peer (same arguments as the constructor) in a thread of its own."""
        return PeerThread(cls(**kwargs))

    # -- serving --------------------------------------------------------------------

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()
        if self._changed is not None:
            self._changed.set()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept(self, reader: Any, writer: Any) -> None:
        # A plain callback (not a coroutine): python-hl7 would start an untracked task.
        conn = _Conn(writer)
        self._conns.add(conn)
        with self._lock:
            self.connections += 1
            self.open_connections += 1
        self._notify()
        self._spawn(self._serve(conn, reader))

    async def _serve(self, conn: _Conn, reader: Any) -> None:
        responder: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._respond(conn))
        try:
            while True:
                raw: bytes = await reader.readblock()
                self._record(conn, raw)
        except Exception:  # noqa: S110 -- EOF, reset, TLS error, a bad block: the client is gone
            pass
        finally:
            # Answers to a client that went away are moot (and a delayed one would wait).
            responder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await responder
            conn.writer.transport.abort()
            self._conns.discard(conn)
            with self._lock:
                self.open_connections -= 1
            self._notify()

    def _record(self, conn: _Conn, raw: bytes) -> None:
        message = _parse(raw)
        control_id = _control_id(message)
        with self._lock:
            self.arrivals.append(raw)
            self.log.append(("recv", control_id))
            duplicate = self.idempotent and control_id in self._seen
            if duplicate:
                self.duplicates += 1
                reply = Reply()
            else:
                self._seen.add(control_id)
                self.messages.append(raw)
                reply = self._script.popleft() if self._script else self.default
        self._notify()
        conn.queue.put_nowait((message, reply))

    async def _respond(self, conn: _Conn) -> None:
        writer = conn.writer
        while True:
            message, reply = await conn.queue.get()
            if reply.delay:
                await asyncio.sleep(reply.delay)  # the behaviour under test, not a sync wait
            fault = reply.fault
            if fault is Fault.SILENT:
                continue
            if fault is Fault.CLOSE:
                writer.close()
                return
            if fault is Fault.HALF_FRAME:
                ack = build_ack(message, reply)
                writer.write(b"\x0b" + ack[: len(ack) // 2])
                await writer.drain()
                writer.close()
                return
            # Logged before the write, so the entry always precedes anything the client
            # does once it has read the answer (even with the client in another thread).
            with self._lock:
                self.log.append(("ack", _control_id(message)))
            self._notify()
            if fault is Fault.GARBAGE:
                writer.write(GARBAGE)
            elif fault is Fault.NOT_ACK:
                writer.writeblock(b"this is not an HL7 message")
            else:
                writer.writeblock(build_ack(message, reply))
            try:
                await writer.drain()
            except ConnectionError:
                return


class PeerThread:
    """An :class:`MllpPeer` served from a background thread, for sync code.

    ``port``, ``messages``, ``arrivals``, ``duplicates``, ``connections``; ``script()``,
    ``wait_for(n, timeout)`` (blocking), ``stop()``. Also a context manager.
    """

    def __init__(self, peer: MllpPeer) -> None:
        self.peer = peer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mllp-peer", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the MLLP peer thread did not start")
        if self._error is not None:
            self._thread.join(5)
            raise RuntimeError("the MLLP peer failed to start") from self._error

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            try:
                await self.peer.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stopping.wait()
            finally:
                await self.peer.stop()

        asyncio.run(main())

    @property
    def port(self) -> int:
        return self.peer.port

    @property
    def messages(self) -> list[bytes]:
        with self.peer._lock:
            return list(self.peer.messages)

    @property
    def arrivals(self) -> list[bytes]:
        with self.peer._lock:
            return list(self.peer.arrivals)

    @property
    def duplicates(self) -> int:
        with self.peer._lock:
            return self.peer.duplicates

    @property
    def connections(self) -> int:
        with self.peer._lock:
            return self.peer.connections

    def script(self, *replies: Reply) -> None:
        self.peer.script(*replies)

    def wait_for(self, n: int, timeout: float = 5.0) -> list[bytes]:
        """Block until ``n`` messages are recorded; AssertionError after ``timeout``."""
        with self.peer._lock:
            if not self.peer._lock.wait_for(lambda: len(self.peer.messages) >= n, timeout):
                raise AssertionError(
                    f"peer got {len(self.peer.messages)} message(s) within {timeout}s, expected {n}"
                )
            return list(self.peer.messages[:n])

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    def __enter__(self) -> PeerThread:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def server_tls(
    cert: str, key: str, *, client_ca: str | None = None, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A server context for the peer; ``client_ca`` makes it require client certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx
