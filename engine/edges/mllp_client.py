"""An MLLP client for analysts (``refloop send``) and tests: one message in flight,
MSA-2 checked against the control id sent."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from engine.protocol.hl7v2 import HeaderError, parse_header, split_segments
from engine.protocol.mllp import Frame, FrameDecoder, encode


@dataclass(frozen=True, slots=True)
class AckReceipt:
    control_id: str
    code: str  # MSA-1, or "" when the answer had none
    text: str  # MSA-3 / ERR reason
    raw: bytes

    @property
    def ok(self) -> bool:
        return self.code in ("AA", "CA")


def read_messages(path: Path) -> list[bytes]:
    """Messages in a file: one segment per line (CR, LF or CRLF); blank lines or a new
    MSH separate messages; ``#`` lines are comments. Segments are re-joined with CR."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    messages: list[list[str]] = []
    current: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                messages.append(current)
                current = []
            continue
        if line.startswith("MSH") and current:
            messages.append(current)
            current = []
        current.append(line)
    if current:
        messages.append(current)
    return [("\r".join(m) + "\r").encode("utf-8", "surrogateescape") for m in messages]


def client_tls(
    ca: Path | None, cert: Path | None, key: Path | None, *, server_hostname_check: bool = True
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.check_hostname = server_hostname_check
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def parse_ack(raw: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, reason) from an ACK payload."""
    text = raw.decode("latin-1")
    code = control = reason = ""
    fs = "|"
    with contextlib.suppress(HeaderError):
        fs = parse_header(raw).field_sep
    for seg in split_segments(text):
        fields = seg.split(fs)
        if fields[0] == "MSA":
            code = fields[1] if len(fields) > 1 else ""
            control = fields[2] if len(fields) > 2 else ""
            reason = fields[3] if len(fields) > 3 else ""
        elif fields[0] == "ERR" and not reason:
            reason = fields[8] if len(fields) > 8 else ""
    return code, control, reason


class MllpClient:
    def __init__(
        self, host: str, port: int, *, tls: ssl.SSLContext | None = None, timeout: float = 30.0
    ) -> None:
        self.host, self.port, self.tls, self.timeout = host, port, tls, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = FrameDecoder()
        self._frames: list[bytes] = []

    async def __aenter__(self) -> MllpClient:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host,
                self.port,
                ssl=self.tls,
                server_hostname=self.host if self.tls else None,
            ),
            self.timeout,
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await self._writer.wait_closed()

    async def send(self, message: bytes) -> AckReceipt:
        assert self._writer is not None
        assert self._reader is not None
        try:
            control_id = parse_header(message).control_id
        except HeaderError:
            control_id = ""
        self._writer.write(encode(message))
        await self._writer.drain()
        raw = await asyncio.wait_for(self._next_frame(), self.timeout)
        code, acked, reason = parse_ack(raw)
        if acked != control_id:
            return AckReceipt(control_id, "", f"ACK names control id {acked!r}, not ours", raw)
        return AckReceipt(control_id, code, reason, raw)

    async def _next_frame(self) -> bytes:
        assert self._reader is not None
        while not self._frames:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("the peer closed the connection without an answer")
            self._frames.extend(e.payload for e in self._decoder.feed(data) if isinstance(e, Frame))
        return self._frames.pop(0)
