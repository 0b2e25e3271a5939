"""The MLLP channel: HL7 v2 messages to a peer's listener, one in flight per connection.

Theory of operation
-------------------
Every target (``host:port``: the configured one, or the one an envelope's ``endpoint``
names) has one :class:`_Target`: a lock, at most one live connection and its reconnect
backoff. ``send`` holds the target's lock from write to ACK, so a connection carries one
message at a time. MLLP has no request ids: the only thing pairing an ACK with a message is
MSA-2, and only strict alternation keeps the pairs in step.

A connection is a thin :class:`asyncio.Protocol` (:class:`_Link`) around the sans-IO
:class:`~engine.protocol.mllp.FrameDecoder`. It is dropped, never reused, as soon as the
stream may be out of step: no ACK in time (a late one could arrive later and be taken for
the next message's), an ACK naming another control id, a second frame in answer, anything
sent while nobody asked, garbage, a half frame, the peer closing. The next send opens a
fresh connection. An AE or AR keeps it: the peer answered in step.

What the peer said, as the dispatcher sees it:

==========================================  ================================================
AA, CA with MSA-2 = the MSH-10 sent          :class:`Receipt` (``peer_reference`` = MSA-2)
AE, CE                                       :class:`RetryableError`
AR, CR                                       :class:`PermanentError`
MSA-2 of another message                     retryable, connection dropped
no ACK within ``ack_timeout_seconds``        retryable, connection dropped
garbage, no MSA, closed or reset mid-ACK     retryable, connection dropped
refused, unreachable, TLS handshake failed   retryable, and the target backs off
==========================================  ================================================

MSA-2 is checked against the MSH-10 in the payload itself, which is what the peer echoes;
``metadata["control_id"]`` is the renderer's copy of it and is not needed here.

A failed connect starts a backoff for that target (``reconnect_initial_seconds``,
doubling up to ``reconnect_max_seconds``, reset by the next successful connect). Inside
the window ``send`` fails at once with ``retry_after`` set instead of sleeping: waiting is
the dispatcher's job, and a send never takes longer than the connect and ACK timeouts.
The window is measured on the context's clock, so tests move time instead of waiting.

Reasons are built from codes only (MSA-1, ERR-3.1, TLS and errno names): MSA-3, ERR-8
and the rest of a peer's free text may echo the message and are never read.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

from channels._common import config_path
from channels.base import (
    HL7V2,
    ChannelConfigError,
    ChannelContext,
    ChannelError,
    ChannelSettings,
    Envelope,
    PermanentError,
    Receipt,
    RetryableError,
)
from engine.protocol.hl7v2 import HeaderError, parse_header, split_segments
from engine.protocol.mllp import END, START, Frame, FrameDecoder, Junk, Oversize, encode

#: An ACK longer than this is not an ACK.
MAX_ACK_BYTES = 1024 * 1024

_WHITESPACE = b" \t\r\n"
#: What a code from the peer (MSA-1, ERR-3.1) must look like to be quoted in a reason.
_SAFE_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,20}")


class MllpTls(BaseModel):
    """``[channels.<name>.tls]``: TLS to the peer, optionally with a client certificate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path | None = None  # trust only these CAs (default: the system store)
    cert_file: Path | None = None  # our client certificate, for peers that require mTLS
    key_file: Path | None = None  # its key (when not in cert_file)
    # The name the configured host's certificate must carry, when it differs from ``host``
    # (connecting by IP to a certificate issued for a DNS name). Endpoint overrides are
    # checked against their own host.
    server_hostname: str | None = None
    verify: bool = True  # False: encrypt without checking the peer (test rigs only)

    @model_validator(mode="after")
    def _key_needs_cert(self) -> MllpTls:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file")
        return self


class MllpSettings(ChannelSettings):
    """``[channels.<name>]`` with ``type = "mllp"``."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(ge=1, le=65535)
    ack_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    tls: MllpTls | None = None
    reconnect_initial_seconds: float = Field(default=1.0, gt=0, le=3600)
    reconnect_max_seconds: float = Field(default=60.0, gt=0, le=24 * 3600)
    # Close a connection nobody used for this long (peers and firewalls drop idle ones
    # silently; better to reconnect than to find out on the next message).
    idle_close_seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> MllpSettings:
        if self.reconnect_max_seconds < self.reconnect_initial_seconds:
            raise ValueError("reconnect_max_seconds is smaller than reconnect_initial_seconds")
        return self


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); :class:`ValueError` if neither."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [address]:port")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError("expected host:port")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("port must be 1..65535")
    if any(c.isspace() or c in "/@" for c in host):
        raise ValueError("not a host name")
    return host, int(port)


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _safe(code: str) -> str:
    code = code.strip()
    return code if _SAFE_CODE.fullmatch(code) else ""


class _OutOfStep(RetryableError):
    """Retryable, and the connection can no longer be trusted to pair ACKs with messages."""


def read_ack(raw: bytes, control_id: str) -> Receipt:
    """Judge one reply to the message whose MSH-10 is ``control_id`` (pure).

    Returns the receipt for AA/CA; raises :class:`RetryableError` (AE/CE, unknown codes),
    :class:`PermanentError` (AR/CR) or, when the reply does not answer this message,
    a retryable error that also tells the caller to drop the connection.
    """
    try:
        header = parse_header(raw)
    except HeaderError:
        raise _OutOfStep("reply is not an HL7 ACK (no readable MSH)") from None
    fs, comp, sub = header.field_sep, header.component_sep, header.encoding_chars[3]
    msa: list[str] | None = None
    codes: list[str] = []
    for segment in split_segments(raw.decode("latin-1")):
        fields = segment.split(fs)
        if fields[0] == "MSA" and msa is None:
            msa = fields
        elif fields[0] == "ERR":
            # v2.5+: ERR-3 (CWE) "207^Application internal error^HL70357";
            # v2.3/2.4: ERR-1 component 4 "103&Table value not found&HL70357".
            if len(fields) > 3 and fields[3]:
                code, where = _safe(fields[3].split(comp)[0]), "ERR-3"
            elif len(fields) > 1 and len(fields[1].split(comp)) > 3:
                code, where = _safe(fields[1].split(comp)[3].split(sub)[0]), "ERR-1"
            else:
                continue
            if code and f"{where} {code}" not in codes:
                codes.append(f"{where} {code}")
    if msa is None:
        raise _OutOfStep("reply is not an ACK (no MSA segment)")
    ack_code = (msa[1] if len(msa) > 1 else "").strip().upper()
    acked = (msa[2] if len(msa) > 2 else "").strip()
    if acked != control_id:
        raise _OutOfStep(f"ACK for another message (MSA-2 is not {control_id}, the MSH-10 sent)")
    shown = _safe(ack_code) or "without a valid MSA-1"
    detail = f"ACK {shown}" + (f" ({', '.join(codes[:3])})" if codes else "")
    if ack_code in ("AA", "CA"):
        return Receipt(peer_reference=acked, detail=f"ACK {ack_code}")
    if ack_code in ("AR", "CR"):
        raise PermanentError(detail)
    # AE/CE, and codes outside table 0008: the peer may take it next time.
    raise RetryableError(detail)


class _Link(asyncio.Protocol):
    """One connection: frames in, one exchange at a time, and why it broke if it did."""

    def __init__(self, label: str, tls: bool) -> None:
        self.label = label  # host:port, to start every reason with
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.trouble = ""  # set once the stream cannot be trusted: why
        self.closed = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._decoder = FrameDecoder(MAX_ACK_BYTES)
        self._frames: deque[bytes] = deque()
        self._awaiting = False
        self._heard = False  # any byte from the peer yet
        self._close_reason = ""
        self._changed = asyncio.Event()

    @property
    def usable(self) -> bool:
        return (
            not self.closed
            and not self.trouble
            and self.transport is not None
            and not self.transport.is_closing()
        )

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if not self._awaiting or self._frames:
            # Stray line ends after an ACK are common and harmless; anything else is a
            # reply nobody asked for (a late or duplicate ACK): the stream is out of step.
            if data.strip(_WHITESPACE):
                self._fail("the peer sent data that answers no message")
            return
        if not self._decoder.in_frame and data.lstrip(_WHITESPACE)[:1] not in (b"", START):
            self._fail("reply is not MLLP-framed")
            return
        for event in self._decoder.feed(data):
            if isinstance(event, Frame):
                self._frames.append(event.payload)
            elif isinstance(event, Oversize):
                self._fail(f"reply frame is over {MAX_ACK_BYTES} bytes")
            elif isinstance(event, Junk) and event.reason == "abandoned_frame":
                self._fail("reply abandoned a frame midway")
        if len(self._frames) > 1:
            self._fail("more than one reply to one message")
        self._changed.set()

    def eof_received(self) -> bool | None:
        self._note_close(None)
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._note_close(exc)
        if not self.lost.done():
            self.lost.set_result(None)

    # -- used by the channel ----------------------------------------------------------

    async def exchange(self, message: bytes, ack_seconds: float) -> bytes:
        """Write one framed message and return the one frame that answers it."""
        assert self.transport is not None
        self._awaiting = True
        try:
            self.transport.write(encode(message))
            async with asyncio.timeout(ack_seconds):
                while not self._frames and not self.trouble and not self.closed:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            self._fail("no ACK in time")
            raise _OutOfStep(f"{self.label}: no ACK within {ack_seconds:g}s") from None
        finally:
            self._awaiting = False
        if self._frames:
            # Whatever came after the first frame is the caller's cue to drop the link.
            return self._frames.popleft()
        why = self.trouble or self._close_reason or "connection closed"
        raise _OutOfStep(f"{self.label}: {why}")

    def _fail(self, why: str) -> None:
        if not self.trouble:
            self.trouble = why
        self._changed.set()

    def _note_close(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        partial = self._decoder.in_frame
        if isinstance(exc, ssl.SSLError):
            why = f"TLS error ({exc.reason or type(exc).__name__})"
        elif isinstance(exc, ConnectionResetError):
            why = "connection reset by the peer"
        elif isinstance(exc, OSError):
            why = f"connection failed ({_errno_name(exc)})"
        elif partial:
            why = "connection closed mid-ACK (half a frame)"
        else:
            why = "connection closed without an ACK"
        if self.tls and not self._heard and not isinstance(exc, ssl.SSLError):
            why += " (over TLS: the peer may have refused our client certificate)"
        self._close_reason = why
        self._changed.set()


def _errno_name(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno]
    return type(exc).__name__


@dataclass(eq=False)
class _Target:
    host: str
    port: int
    server_hostname: str | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    link: _Link | None = None
    failures: int = 0  # connects failed in a row
    failed_at: float = 0.0
    not_before: float = 0.0  # on the context clock: no connect attempt before this
    idle: asyncio.TimerHandle | None = None

    @property
    def label(self) -> str:
        return _label(self.host, self.port)


class MllpChannel:
    """Sends HL7 v2 (ER7) payloads over MLLP and judges the ACK (see the module doc)."""

    Settings: ClassVar[type[ChannelSettings]] = MllpSettings

    def __init__(self, name: str, settings: MllpSettings, context: ChannelContext) -> None:
        self.name = name
        self.settings = settings
        self._clock = context.clock
        self._tls = _tls_context(settings.tls, context.base_dir) if settings.tls else None
        self._targets: dict[tuple[str, int], _Target] = {}
        self._dying: set[_Link] = set()

    async def send(self, envelope: Envelope) -> Receipt:
        control_id = _control_id(envelope)
        target = self._target(envelope.endpoint)
        async with target.lock:
            if target.idle is not None:
                target.idle.cancel()
                target.idle = None
            link = await self._link(target)
            try:
                raw = await link.exchange(envelope.payload, self.settings.ack_timeout_seconds)
            except BaseException:
                # Timed out, broke, or was cancelled between write and ACK: either way a
                # late ACK may still come on this stream.
                self._drop(target)
                raise
            if not link.usable:
                self._drop(target)
            try:
                return read_ack(raw, control_id)
            except _OutOfStep:
                self._drop(target)
                raise
            finally:
                self._arm_idle(target)

    async def aclose(self) -> None:
        for target in self._targets.values():
            if target.idle is not None:
                target.idle.cancel()
                target.idle = None
            self._drop(target, graceful=True)
        dying = [link.lost for link in self._dying]
        if dying:
            _, pending = await asyncio.wait(dying, timeout=2.0)
            for link in list(self._dying):
                if link.transport is not None and not link.lost.done():
                    link.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    # -- targets and connections ------------------------------------------------------

    def _target(self, endpoint: str) -> _Target:
        if endpoint:
            try:
                host, port = parse_endpoint(endpoint)
            except ValueError as exc:
                shown = endpoint[:80]
                raise PermanentError(f"endpoint {shown!r} is not host:port ({exc})") from None
            configured = (host, port) == (self.settings.host, self.settings.port)
        else:
            host, port, configured = self.settings.host, self.settings.port, True
        target = self._targets.get((host, port))
        if target is None:
            tls = self.settings.tls
            if self._tls is None:
                server_hostname = None
            elif configured and tls is not None and tls.server_hostname:
                server_hostname = tls.server_hostname
            else:
                server_hostname = host
            target = self._targets[(host, port)] = _Target(host, port, server_hostname)
        return target

    async def _link(self, target: _Target) -> _Link:
        if target.link is not None:
            if target.link.usable:
                return target.link
            self._drop(target)
        now = self._clock()
        # A clock that went backwards must not stretch the window.
        if target.failures and target.failed_at <= now < target.not_before:
            wait = target.not_before - now
            raise RetryableError(
                f"{target.label}: not reconnecting yet after {target.failures} failed "
                f"connect(s); next try in {wait:.1f}s",
                retry_after=wait,
            )
        try:
            target.link = await self._connect(target)
        except ChannelError:
            target.failures += 1
            delay = min(
                self.settings.reconnect_initial_seconds * 2 ** min(target.failures - 1, 30),
                self.settings.reconnect_max_seconds,
            )
            target.failed_at = self._clock()
            target.not_before = target.failed_at + delay
            raise
        target.failures = 0
        return target.link

    async def _connect(self, target: _Target) -> _Link:
        loop = asyncio.get_running_loop()
        timeout = self.settings.connect_timeout_seconds
        tls = self._tls
        where = target.label
        # TCP first, then TLS, so a failure says which of the two went wrong: a reset in
        # the handshake is how many servers refuse a client certificate.
        phase = "connect"
        try:
            async with asyncio.timeout(timeout):
                transport, link = await loop.create_connection(
                    lambda: _Link(where, tls is not None), target.host, target.port
                )
                if tls is not None:
                    phase = "TLS handshake"
                    try:
                        secured = await loop.start_tls(
                            transport,
                            link,
                            tls,
                            server_hostname=target.server_hostname,
                            ssl_handshake_timeout=timeout,
                        )
                    except BaseException:
                        transport.abort()
                        raise
                    assert secured is not None
                    link.transport = secured
        except TimeoutError:
            raise RetryableError(f"{where}: {phase} timed out after {timeout:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            raise RetryableError(
                f"{where}: TLS handshake failed: peer certificate not accepted "
                f"({exc.verify_message or exc.reason})"
            ) from None
        except ssl.SSLError as exc:
            raise RetryableError(
                f"{where}: TLS handshake failed ({exc.reason or type(exc).__name__})"
            ) from None
        except ConnectionRefusedError:
            raise RetryableError(f"{where}: connection refused") from None
        except socket.gaierror:
            raise RetryableError(f"{where}: cannot resolve the host name") from None
        except OSError as exc:
            raise RetryableError(f"{where}: {phase} failed ({_errno_name(exc)})") from None
        return link

    def _drop(self, target: _Target, *, graceful: bool = False) -> None:
        link, target.link = target.link, None
        if link is None or link.transport is None:
            return
        if not link.lost.done():
            self._dying.add(link)
            link.lost.add_done_callback(lambda _: self._dying.discard(link))
        if graceful:
            link.transport.close()
        else:
            link.transport.abort()

    def _arm_idle(self, target: _Target) -> None:
        idle = self.settings.idle_close_seconds
        if idle is None or target.link is None:
            return
        loop = asyncio.get_running_loop()
        target.idle = loop.call_later(idle, self._idle_close, target)

    def _idle_close(self, target: _Target) -> None:
        target.idle = None
        if not target.lock.locked():  # a send in progress re-arms the timer when done
            self._drop(target, graceful=True)


def _control_id(envelope: Envelope) -> str:
    """The MSH-10 the peer will echo in MSA-2; PermanentError when there is none."""
    if envelope.content_type != HL7V2:
        raise PermanentError(
            f"the mllp channel carries HL7 v2 (ER7) only, not {envelope.content_type[:60]!r}"
        )
    if START[0] in envelope.payload or END[0] in envelope.payload:
        raise PermanentError("payload contains MLLP framing bytes (0x0B or 0x1C)")
    try:
        header = parse_header(envelope.payload)
    except HeaderError as exc:
        raise PermanentError(f"payload is not a sendable HL7 v2 message: {exc.reason}") from None
    return header.control_id.strip()


def _tls_context(tls: MllpTls, base: Path) -> ssl.SSLContext:
    """The client context, built once; unreadable files are a config error at start."""
    problems = []
    if tls.ca_file is not None:
        # Only the named CAs, as the other channels do: a peer vouched for by some public
        # CA is not the specialist's interface engine.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca_file = config_path(tls.ca_file, base)
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"tls.ca_file: cannot load {ca_file}: {_why(exc)}")
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None:
        cert_file = config_path(tls.cert_file, base)
        key = str(config_path(tls.key_file, base)) if tls.key_file is not None else None
        try:
            ctx.load_cert_chain(str(cert_file), key)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"tls.cert_file: cannot load {cert_file}: {_why(exc)}")
    if problems:
        raise ChannelConfigError(problems)
    return ctx


def _why(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or "not a PEM certificate or key"
    return exc.strerror or type(exc).__name__
