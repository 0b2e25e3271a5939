"""The MLLP listener: a thin asyncio shell around the frame decoder and intake.

Per connection, frames are handled strictly in order (MLLP is a request/response
protocol, and pipelined frames must be answered in the order sent). Each frame is
assessed (pure), committed by the group-commit writer, and only then acknowledged.
Reading pauses while a connection has too many frames waiting, so a fast sender
cannot grow our memory without bound.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
import zoneinfo
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine.config import ConfigError, ListenerConfig
from engine.logs import get_logger
from engine.metrics import Metrics
from engine.protocol.ack import Outcome, next_control_id
from engine.protocol.mllp import Frame, FrameDecoder, Junk, Oversize, encode
from engine.services.intake import (
    Answer,
    Intake,
    Policy,
    ack_for,
    assess,
    assess_oversize,
    record,
    storage_failure_ack,
)
from engine.services.writer import GroupCommitWriter, StorageUnavailable

log = get_logger("refloop.mllp")

_HIGH_WATER_FRAMES = 32
_HANGUP_GRACE_SECONDS = 2.0
_TLS_HANDSHAKE_SECONDS = 10.0
_OUTCOME_LABEL = {Outcome.ACCEPT: "accepted", Outcome.ERROR: "error", Outcome.REJECT: "rejected"}


def policy_from(cfg: ListenerConfig) -> Policy:
    return Policy(
        ack_mode=cfg.ack_mode,
        default_charset=cfg.default_charset,
        strict_segment_terminators=cfg.strict_segment_terminators,
        message_types=frozenset(cfg.message_types),
        duplicate_window=timedelta(seconds=cfg.duplicate_window_seconds),
        max_message_bytes=cfg.max_message_bytes,
        honour_accept_ack_type=cfg.honour_accept_ack_type,
    )


def tls_context(cfg: ListenerConfig, base: Path = Path()) -> ssl.SSLContext | None:
    """The server TLS context; relative file names are relative to ``base``."""
    tls = cfg.tls
    if tls is None:
        return None

    def where(path: Path) -> str:
        return str(path if path.is_absolute() else base / path)

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    password = tls.key_password.read(base) if tls.key_password else None
    try:
        ctx.load_cert_chain(where(tls.cert_file), where(tls.key_file), password=password)
        if tls.client_ca_file is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=where(tls.client_ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"listener {cfg.name}: cannot load TLS files ({getattr(exc, 'reason', None) or exc}); "
            "check cert_file, key_file, client_ca_file and key_password"
        ) from None
    return ctx


class MllpListener:
    def __init__(
        self,
        cfg: ListenerConfig,
        writer: GroupCommitWriter,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] | None = None,
        base_dir: Path = Path(),
        commit_timeout: float = 10.0,
    ) -> None:
        self.cfg = cfg
        self.commit_timeout = commit_timeout
        self.base_dir = base_dir
        self.policy = policy_from(cfg)
        self.writer = writer
        self.metrics = metrics
        self.networks = cfg.networks()
        self.tz = zoneinfo.ZoneInfo(cfg.timezone)
        # Injected so tests (and, later, the simulator) can run in virtual time.
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.connections: set[MllpConnection] = set()
        self.server: asyncio.Server | None = None
        self.tls: ssl.SSLContext | None = None
        self._label_messages: dict[tuple[str, str], Any] = {}
        metrics.declare_listener(cfg.name, tls=cfg.tls is not None)
        self.ack_latency = metrics.ack_latency.labels(cfg.name)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # TLS starts per connection, after the CIDR and connection-limit checks: a peer
        # we refuse never gets a handshake, and a failed handshake is reported with its
        # peer address (asyncio's server-side TLS would hide both).
        self.tls = tls_context(self.cfg, self.base_dir)
        self.server = await loop.create_server(
            lambda: MllpConnection(self),
            host=self.cfg.host,
            port=self.cfg.port,
            reuse_address=True,
            backlog=512,
        )
        log.info(
            "mllp.listener.started",
            listener=self.cfg.name,
            host=self.cfg.host,
            port=self.port,
            tls=self.cfg.tls is not None,
            mutual_tls=bool(self.cfg.tls and self.cfg.tls.client_ca_file),
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - one bound for all
        """Finish every frame already received (ACKs included), then close.

        Frames still in the kernel's buffer were never received: they are not ACKed,
        so the sender keeps them and resends to the next instance. Each connection is
        half-closed after its last ACK and given a moment to hang up itself, because
        closing a socket with unread input makes the kernel send a reset, which can
        destroy ACKs the peer has not read yet.
        """
        conns = list(self.connections)
        for conn in conns:
            conn.stop_reading()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(c.idle.wait() for c in conns))
        except TimeoutError:
            log.error("mllp.drain.timeout", listener=self.cfg.name, connections=len(conns))
        for conn in conns:
            conn.finish()
        try:
            async with asyncio.timeout(_HANGUP_GRACE_SECONDS):
                await asyncio.gather(*(c.gone.wait() for c in conns))
        except TimeoutError:
            pass
        for conn in conns:
            conn.abort()
        if self.server is not None:
            await self.server.wait_closed()

    def count(self, type_label: str, outcome: str) -> None:
        key = (type_label, outcome)
        child = self._label_messages.get(key)
        if child is None:
            child = self.metrics.messages.labels(self.cfg.name, key[0], outcome)
            self._label_messages[key] = child
        child.inc()

    def allowed(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks if net.version == addr.version)


class MllpConnection(asyncio.Protocol):
    def __init__(self, listener: MllpListener) -> None:
        self.listener = listener
        self.decoder = FrameDecoder(listener.cfg.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.frames: deque[Frame | Oversize] = deque()
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.gone = asyncio.Event()
        self.finishing = False
        self.draining = False
        self.task: asyncio.Task[None] | None = None
        self.reading = True
        self.last_activity = time.monotonic()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.registered = False

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        lst = self.listener
        name = lst.cfg.name
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else "unknown"
        self.peer = f"{host}:{peer[1]}" if peer else "unknown"
        if not lst.allowed(host):
            lst.metrics.refused.labels(name, "cidr").inc()
            log.warning("mllp.connection.refused", listener=name, peer=self.peer, reason="cidr")
            transport.abort()
            return
        if len(lst.connections) >= lst.cfg.max_connections:
            lst.metrics.refused.labels(name, "max_connections").inc()
            log.warning(
                "mllp.connection.refused", listener=name, peer=self.peer, reason="max_connections"
            )
            transport.abort()
            return
        self.registered = True
        lst.connections.add(self)
        lst.metrics.connections.labels(name).inc()
        log.info("mllp.connection.opened", listener=name, peer=self.peer)
        loop = asyncio.get_running_loop()
        if lst.tls is not None:
            transport.pause_reading()  # the ClientHello is for start_tls, not the decoder
            self.task = loop.create_task(self._secure_then_work(lst.tls))
        else:
            self.task = loop.create_task(self._worker())
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.finishing:
            return  # shutting down: not received, not ACKed; the sender will resend
        for event in self.decoder.feed(data):
            if isinstance(event, Junk):
                self._junk(event)
            else:
                self.frames.append(event)
                self.idle.clear()
                self.wakeup.set()
        if len(self.frames) >= _HIGH_WATER_FRAMES and self.reading and self.transport:
            self.transport.pause_reading()
            self.reading = False

    def connection_lost(self, exc: Exception | None) -> None:
        for event in self.decoder.close():
            if isinstance(event, Junk):
                self._junk(event)
        self.gone.set()
        self.wakeup.set()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.registered:
            lst = self.listener
            lst.connections.discard(self)
            lst.metrics.connections.labels(lst.cfg.name).dec()
            log.info("mllp.connection.closed", listener=lst.cfg.name, peer=self.peer)
            self.registered = False

    # -- the per-connection worker ---------------------------------------------------

    async def _secure_then_work(self, ctx: ssl.SSLContext) -> None:
        lst = self.listener
        raw = self.transport
        assert raw is not None
        try:
            secured = await asyncio.get_running_loop().start_tls(
                raw, self, ctx, server_side=True, ssl_handshake_timeout=_TLS_HANDSHAKE_SECONDS
            )
        except (OSError, TimeoutError, ConnectionError) as exc:  # ssl.SSLError is an OSError
            lst.metrics.refused.labels(lst.cfg.name, "tls_handshake").inc()
            # OpenSSL's reason code only (e.g. CERTIFICATE_VERIFY_FAILED): no PHI.
            log.warning(
                "mllp.connection.refused",
                listener=lst.cfg.name,
                peer=self.peer,
                reason="tls_handshake",
                tls_error=getattr(exc, "reason", None) or type(exc).__name__,
            )
            raw.abort()
            # start_tls gave the socket to its own protocol: we are not told it closed.
            self.connection_lost(None)
            return
        if secured is None:  # the peer went away during the handshake
            self.connection_lost(None)
            return
        self.transport = secured
        await self._worker()

    async def _worker(self) -> None:
        while True:
            if not self.frames:
                self.idle.set()
                if self.gone.is_set():
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            item = self.frames.popleft()
            if (
                not self.reading
                and not self.draining
                and len(self.frames) < _HIGH_WATER_FRAMES // 2
                and self.transport
            ):
                self.reading = True
                self.transport.resume_reading()
            try:
                await self._handle(item)
            except Exception:  # never let one frame kill the connection's worker
                log.exception("mllp.frame.failed", listener=self.listener.cfg.name)
            if isinstance(item, Oversize):
                self.close()

    async def _handle(self, item: Frame | Oversize) -> None:
        lst = self.listener
        started = time.perf_counter()
        received_at = lst.clock()
        if isinstance(item, Oversize):
            lst.metrics.framing_errors.labels(lst.cfg.name, "oversize").inc()
            intake = assess_oversize(item.prefix, item.size, lst.policy)
            payload, size = item.prefix, item.size
        else:
            intake = assess(item.payload, lst.policy)
            payload, size = item.payload, len(item.payload)
        answer = ack_for(
            intake,
            lst.policy.ack_mode,
            control_id=next_control_id(),
            now=received_at.astimezone(lst.tz),
            honour_accept_ack_type=lst.policy.honour_accept_ack_type,
        )
        row = record(
            intake,
            payload=payload,
            listener=lst.cfg.name,
            peer=self.peer,
            received_at=received_at,
            answer=answer,
            size=size,
        )
        outcome = _OUTCOME_LABEL[intake.outcome]
        label = intake.type_label
        try:
            async with asyncio.timeout(lst.commit_timeout):  # no extra task per message
                stored = await lst.writer.store(row, lst.policy.duplicate_window)
        except (StorageUnavailable, TimeoutError):
            ack: bytes | None = storage_failure_ack(
                intake,
                lst.policy.ack_mode,
                control_id=next_control_id(),
                now=received_at.astimezone(lst.tz),
            )
            outcome = "storage_error"
            log.error("mllp.message.not_stored", listener=lst.cfg.name, message_type=label)
        else:
            ack = answer.ack
            if stored.conflict_with is not None:
                ack = stored.ack
                outcome = "rejected"
                log.warning(
                    "ingest.duplicate.conflict",
                    listener=lst.cfg.name,
                    message_id=stored.message_id,
                    original_id=stored.conflict_with,
                )
            elif stored.duplicate_of is not None:
                ack = stored.ack
                outcome = "duplicate"
            _log_stored(lst.cfg.name, intake, label, answer, stored.message_id, outcome)
        lst.count(label, outcome)
        if (
            ack is not None
            and self.transport is not None
            and not self.transport.is_closing()
            and not self.finishing  # half-closed after the drain timed out: no more writes
        ):
            self.transport.write(encode(ack))
        lst.ack_latency.observe(time.perf_counter() - started)

    # -- helpers -------------------------------------------------------------------

    def _junk(self, event: Junk) -> None:
        name = self.listener.cfg.name
        self.listener.metrics.framing_errors.labels(name, event.reason).inc()
        self.listener.metrics.junk_bytes.labels(name).inc(event.size)
        log.warning(
            "mllp.framing.junk",
            listener=name,
            peer=self.peer,
            bytes=event.size,
            reason=event.reason,
        )

    def _arm_idle_timer(self) -> None:
        timeout = self.listener.cfg.idle_timeout_seconds
        loop = asyncio.get_running_loop()
        self.idle_timer = loop.call_at(loop.time() + timeout, self._check_idle)

    def _check_idle(self) -> None:
        timeout = self.listener.cfg.idle_timeout_seconds
        quiet = time.monotonic() - self.last_activity
        if quiet >= timeout and self.idle.is_set() and not self.gone.is_set():
            name = self.listener.cfg.name
            self.listener.metrics.framing_errors.labels(name, "idle_timeout").inc()
            log.info("mllp.connection.idle_timeout", listener=name, peer=self.peer)
            self.close()
            return
        loop = asyncio.get_running_loop()
        self.idle_timer = loop.call_at(loop.time() + max(timeout - quiet, 0.05), self._check_idle)

    def stop_reading(self) -> None:
        self.draining = True  # and stays so: flow control must not resume reading now
        if self.transport is not None and self.reading and not self.transport.is_closing():
            self.transport.pause_reading()
            self.reading = False

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def finish(self) -> None:
        """Half-close after the last ACK and read (and drop) until the peer hangs up."""
        t = self.transport
        if t is None or t.is_closing():
            return
        self.finishing = True
        if t.can_write_eof():
            t.write_eof()
            t.resume_reading()
            self.reading = True
        else:
            t.close()

    def abort(self) -> None:
        if self.transport is not None and not self.gone.is_set():
            self.transport.abort()


def _log_stored(
    listener: str, intake: Intake, label: str, answer: Answer, message_id: int, outcome: str
) -> None:
    if intake.error is not None:
        log.warning(
            "mllp.message.refused",
            listener=listener,
            message_id=message_id,
            message_type=label,
            ack_code=answer.code,
            error_code=intake.error.code,
            reason=intake.error.reason,
        )
    else:
        log.debug(
            "mllp.message.stored",
            listener=listener,
            message_id=message_id,
            message_type=label,
            outcome=outcome,
        )
