"""A whole HL7 v2 message, split lazily, read through 1-based paths.

The ingest path never needs this (the ACK reads MSH only); normalisation does. Splitting
is lazy and cached per segment: a mapping that reads PID-3 and ORC-2 does not pay for the
150 OBX segments of a consult note. Values come back *still escaped* from :meth:`raw` and
unescaped from :meth:`value`.

Three states, kept apart as HL7 requires (v2 §2.5.3):

* :data:`ABSENT` — the field (component, …) was not sent: ``||`` or beyond the end;
* :data:`NULL` — the sender sent ``""``: "delete this value";
* a string — a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from engine.protocol.hl7v2 import HeaderError, parse_header, split_segments


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


class _Null:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NULL"

    def __bool__(self) -> bool:
        return False


ABSENT: Final = _Absent()
NULL: Final = _Null()
Value = str | _Absent | _Null


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"


class Segment:
    """One segment; fields are split on first access."""

    __slots__ = ("_fields", "_text", "delims", "name")

    def __init__(self, text: str, delims: Delimiters) -> None:
        self._text = text
        self.delims = delims
        self.name = text[:3]
        self._fields: list[str] | None = None

    @property
    def text(self) -> str:
        return self._text

    def _split(self) -> list[str]:
        if self._fields is None:
            parts = self._text.split(self.delims.field)
            if self.name == "MSH":
                # MSH-1 is the separator itself, so MSH-n is parts[n - 1]; keep the
                # indexing uniform by inserting MSH-1.
                parts = [parts[0], self.delims.field, *parts[1:]]
            self._fields = parts
        return self._fields

    def field(self, n: int) -> str | None:
        """Field ``n`` (1-based) as sent, or None when beyond the segment's end."""
        if n < 1:
            raise ValueError("HL7 field numbers start at 1")
        fields = self._split()
        return fields[n] if n < len(fields) else None


class Message:
    """A parsed message: segments in order, each split lazily."""

    __slots__ = ("_by_name", "delims", "segments")

    def __init__(self, segments: list[Segment], delims: Delimiters) -> None:
        self.segments = segments
        self.delims = delims
        self._by_name: dict[str, list[Segment]] | None = None

    @classmethod
    def parse(cls, text: str) -> Message:
        """Split a decoded message into segments (CR, LF or CRLF terminators).

        Raises :class:`engine.protocol.hl7v2.HeaderError` when the MSH cannot be read.
        """
        header = parse_header(text.encode("utf-8", "surrogateescape"))
        enc = header.encoding_chars
        delims = Delimiters(header.field_sep, enc[0], enc[1], enc[2], enc[3])
        segments = [Segment(s, delims) for s in split_segments(text.lstrip("\ufeff"))]
        if not segments or segments[0].name != "MSH":
            raise HeaderError(100, "message does not start with an MSH segment", field="MSH")
        return cls(segments, delims)

    def all(self, name: str) -> list[Segment]:
        """Every segment called ``name``, in message order (indexed on first use)."""
        if self._by_name is None:
            index: dict[str, list[Segment]] = {}
            for seg in self.segments:
                index.setdefault(seg.name, []).append(seg)
            self._by_name = index
        return self._by_name.get(name, [])

    def unescape(self, raw: str) -> str:
        return unescape(raw, self.delims)


def classify(raw: str | None) -> Value:
    """Raw text of a field/component → ABSENT, NULL or the (still escaped) value."""
    if raw is None or raw == "":
        return ABSENT
    if raw == '""':
        return NULL
    return raw


def unescape(raw: str, d: Delimiters) -> str:
    """Resolve HL7 escape sequences (v2 §2.7): \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ and \\Xhh\\.

    Formatting commands (``\\.br\\`` and friends) become a line feed or are dropped;
    highlighting and character-set switches are dropped. Unknown or unterminated
    sequences are kept as sent: losing text is worse than showing an escape.
    """
    esc = d.escape
    if esc not in raw:
        return raw
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        ch = raw[i]
        if ch != esc:
            out.append(ch)
            i += 1
            continue
        end = raw.find(esc, i + 1)
        if end < 0:
            out.append(raw[i:])
            break
        seq = raw[i + 1 : end]
        replacement = _ESCAPES.get(seq)
        if replacement is not None:
            out.append(getattr(d, replacement))
        elif seq == ".br":
            out.append("\n")
        elif seq.startswith("X") and _is_hex(seq[1:]):
            out.append(bytes.fromhex(seq[1:]).decode("latin-1"))
        elif seq in ("H", "N") or seq.startswith((".", "C", "M", "Z")):
            pass
        else:
            out.append(raw[i : end + 1])
        i = end + 1
    return "".join(out)


_ESCAPES = {"F": "field", "S": "component", "T": "subcomponent", "R": "repetition", "E": "escape"}


def _is_hex(text: str) -> bool:
    return len(text) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in text) and bool(text)
