"""MLLP framing, sans I/O.

Theory of operation
-------------------
MLLP (HL7 v2 Minimal Lower Layer Protocol, release 1) wraps each message as

    <VT 0x0B> payload <FS 0x1C><CR 0x0D>

TCP gives us a byte stream, not frames, so a frame may arrive over many reads and
several frames may arrive in one read. :class:`FrameDecoder` is fed whatever bytes
arrived and returns the events they complete; it never blocks and never touches a
socket, so it can be tested byte by byte and under every split.

The decoder has three states:

* ``OUTSIDE``   — between frames. Everything up to the next VT is junk: it is
  discarded and reported (senders add stray LFs after FS CR, or keep-alive bytes),
  but a frame that follows junk in the same read is never lost.
* ``INSIDE``    — collecting a payload until FS CR. A VT seen here means the sender
  abandoned the frame and started over (common after a sender-side timeout): the
  partial payload is reported as junk and a new frame starts.
* ``DISCARDING`` — the frame grew past ``max_frame_bytes``. We keep a bounded prefix
  (so the header can still be read for the NAK), drop the rest, and report
  :class:`Oversize` once the frame ends; the listener then NAKs and closes. A VT here
  abandons the frame exactly as in ``INSIDE``, so the events never depend on where
  the reads happened to split the stream.

FS not followed by CR is kept as payload: it is not an end of block.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

VT = 0x0B
FS = 0x1C
CR = 0x0D
START = b"\x0b"
END = b"\x1c\r"

#: How much of an oversize frame we keep so its MSH can still be answered.
OVERSIZE_PREFIX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete payload, without the MLLP envelope."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Junk:
    """Bytes that were not inside any frame (or belonged to an abandoned one)."""

    size: int
    reason: str  # "outside_frame" | "abandoned_frame"


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame longer than the limit; only ``prefix`` of it was kept."""

    prefix: bytes
    size: int


Event = Frame | Junk | Oversize


class _State(Enum):
    OUTSIDE = auto()
    INSIDE = auto()
    DISCARDING = auto()


class FrameDecoder:
    """Incremental MLLP decoder: ``feed(bytes) -> list[Event]``."""

    __slots__ = ("_buf", "_fs_pending", "_junk", "_max", "_size", "_state")

    def __init__(self, max_frame_bytes: int = 10 * 1024 * 1024) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._state = _State.OUTSIDE
        self._junk = 0
        self._size = 0  # payload bytes seen so far in DISCARDING (may include a trailing FS)
        self._fs_pending = False  # DISCARDING: the last byte seen was FS

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame (what the decoder is holding, for inspection)."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        return self._state is not _State.OUTSIDE

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        pos = 0
        n = len(data)
        while pos < n:
            if self._state is _State.OUTSIDE:
                start = data.find(START, pos)
                if start < 0:
                    self._junk += n - pos
                    break
                self._junk += start - pos
                self._flush_junk(events, "outside_frame")
                self._state = _State.INSIDE
                pos = start + 1
            elif self._state is _State.INSIDE:
                pos = self._scan_inside(data, pos, events)
            else:
                pos = self._scan_discarding(data, pos, events)
        return events

    def close(self) -> list[Event]:
        """The peer went away: whatever was buffered is junk."""
        events: list[Event] = []
        if self._state is _State.INSIDE:
            self._junk += len(self._buf)
        elif self._state is _State.DISCARDING:
            self._junk += self._size
        if self._state is not _State.OUTSIDE:
            self._reset()
            self._flush_junk(events, "abandoned_frame")
        self._flush_junk(events, "outside_frame")
        return events

    # -- internals ---------------------------------------------------------------

    def _reset(self) -> None:
        self._buf.clear()
        self._size = 0
        self._fs_pending = False
        self._state = _State.OUTSIDE

    def _flush_junk(self, events: list[Event], reason: str) -> None:
        if self._junk:
            events.append(Junk(self._junk, reason))
            self._junk = 0

    def _scan_inside(self, data: bytes, pos: int, events: list[Event]) -> int:
        # A frame end may straddle reads: FS last in the buffer, CR first in data.
        if self._buf and self._buf[-1] == FS and data[pos] == CR:
            payload = bytes(self._buf[:-1])
            self._reset()
            events.append(Frame(payload))
            return pos + 1
        end = data.find(END, pos)
        restart = data.find(START, pos, end if end >= 0 else len(data))
        if restart >= 0:
            # The sender gave up on this frame and began another one.
            self._junk += len(self._buf) + (restart - pos)
            self._buf.clear()
            self._flush_junk(events, "abandoned_frame")
            return restart + 1
        stop = end if end >= 0 else len(data)
        # A trailing FS may be the first half of the end block: not payload yet.
        tail_fs = 1 if end < 0 and data[-1] == FS else 0
        if len(self._buf) + (stop - pos) - tail_fs > self._max:
            self._size = len(self._buf) + (stop - pos)
            keep = max(0, OVERSIZE_PREFIX_BYTES - len(self._buf))
            self._buf += data[pos : min(stop, pos + keep)]
            self._state = _State.DISCARDING
            if end >= 0:
                return self._finish_oversize(events, end + 2)
            self._fs_pending = data[-1] == FS
            return len(data)
        if end < 0:
            self._buf += data[pos:]
            return len(data)
        if self._buf:
            self._buf += data[pos:end]
            payload = bytes(self._buf)
        else:
            payload = data[pos:end]
        self._reset()
        events.append(Frame(payload))
        return end + 2

    def _scan_discarding(self, data: bytes, pos: int, events: list[Event]) -> int:
        if self._fs_pending and data[pos] == CR:
            self._size -= 1  # that FS was the end of block, not payload
            return self._finish_oversize(events, pos + 1)
        end = data.find(END, pos)
        restart = data.find(START, pos, end if end >= 0 else len(data))
        if restart >= 0:
            # As in INSIDE: the sender abandoned this (oversize) frame and began another.
            self._junk += self._size + (restart - pos)
            self._reset()
            self._state = _State.INSIDE
            self._flush_junk(events, "abandoned_frame")
            return restart + 1
        stop = end if end >= 0 else len(data)
        room = OVERSIZE_PREFIX_BYTES - len(self._buf)
        if room > 0:
            self._buf += data[pos : min(stop, pos + room)]
        self._size += stop - pos
        if end < 0:
            self._fs_pending = data[-1] == FS
            return len(data)
        return self._finish_oversize(events, end + 2)

    def _finish_oversize(self, events: list[Event], next_pos: int) -> int:
        size = self._size
        prefix = bytes(self._buf[: min(size, OVERSIZE_PREFIX_BYTES)])
        self._reset()
        events.append(Oversize(prefix=prefix, size=size))
        return next_pos


def encode(payload: bytes) -> bytes:
    """Wrap one payload in an MLLP envelope."""
    return START + payload + END
