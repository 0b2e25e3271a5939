"""Just enough HL7 v2 to store and acknowledge a message: the MSH, read lazily.

Acknowledging needs only the header, so the hot path never parses a whole message:
it finds the first segment, checks the delimiters MSH-1/MSH-2 declare, splits that one
segment into fields and stops. Full parsing (python-hl7) happens later, off the ACK path.

Field numbers are 1-based as in the standard: MSH-1 is the field separator itself, so
after splitting the MSH line on it, ``parts[n - 1]`` is MSH-n for n >= 2.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, fields, replace

#: HL7 table 0211 (MSH-18 character set) → Python codec. Vendor spellings seen in the
#: wild (``UTF-8``, ``WINDOWS-1252``) are accepted too: refusing them helps nobody.
CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "ISO IR100": "latin-1",
    "ISO IR101": "iso8859-2",
    "ISO IR109": "iso8859-3",
    "ISO IR110": "iso8859-4",
    "ISO IR144": "iso8859-5",
    "ISO IR127": "iso8859-6",
    "ISO IR126": "iso8859-7",
    "ISO IR138": "iso8859-8",
    "ISO IR148": "iso8859-9",
    "ISO IR192": "utf-8",
    "ISO IR87": "iso2022_jp",
    "ISO IR13": "shift_jis",
    "ISO IR159": "iso2022_jp_2",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "CNS 11643-1992": "big5",
    "BIG-5": "big5",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
}


class HeaderError(Exception):
    """The message cannot be read far enough to be acknowledged normally.

    ``code`` is an HL7 table 0357 error code; ``reason`` is safe to send to the peer and
    to log (it never quotes message content).
    """

    def __init__(self, code: int, reason: str, *, field: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.field = field


@dataclass(frozen=True, slots=True)
class Header:
    """The MSH fields refloop needs, as raw (still escaped) strings."""

    field_sep: str
    encoding_chars: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    timestamp: str
    message_type: str  # MSH-9 as sent, e.g. "ORM^O01^ORM_O01"
    control_id: str
    processing_id: str
    version: str
    accept_ack_type: str
    application_ack_type: str
    charset: str  # MSH-18 first repetition, as sent
    segment_terminator: str  # what ended the MSH segment: "\r", "\n" or "\r\n"

    @property
    def component_sep(self) -> str:
        return self.encoding_chars[0]

    @property
    def message_code(self) -> str:
        """MSH-9.1, e.g. ``ORM``."""
        return self.message_type.split(self.component_sep, 1)[0]

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. ``O01`` (empty when absent)."""
        parts = self.message_type.split(self.component_sep)
        return parts[1] if len(parts) > 1 else ""

    @property
    def type_label(self) -> str:
        """``ORM^O01`` — bounded enough for a metric label once validated."""
        trigger = self.trigger_event
        return f"{self.message_code}^{trigger}" if trigger else self.message_code

    @property
    def enhanced_mode(self) -> bool:
        """Either MSH-15 or MSH-16 valued means enhanced acknowledgement mode."""
        return bool(self.accept_ack_type or self.application_ack_type)

    def recoded(self, codec: str) -> Header:
        """This header re-read with the message's own codec.

        :func:`parse_header` reads MSH as latin-1 (so it never fails); once MSH-18 or the
        listener default names the real codec, a non-ASCII name such as a UTF-8 sending
        facility must be re-read with it, or the ACK echoes and the stored row get mojibake.
        Returns ``self`` unchanged when a field does not decode on its own.
        """
        if all(getattr(self, n).isascii() for n in _HEADER_FIELDS):
            return self  # the usual case: every codec we accept keeps ASCII as is
        try:
            values = {n: getattr(self, n).encode("latin-1").decode(codec) for n in _HEADER_FIELDS}
        except (UnicodeError, LookupError):
            return self
        return replace(self, **values)


_HEADER_FIELDS = tuple(f.name for f in fields(Header))


def _first_segment(payload: bytes) -> tuple[bytes, str]:
    cr = payload.find(b"\r")
    lf = payload.find(b"\n")
    if cr < 0 and lf < 0:
        return payload, ""
    if lf < 0 or (0 <= cr < lf):
        if cr + 1 < len(payload) and payload[cr + 1 : cr + 2] == b"\n":
            return payload[:cr], "\r\n"
        return payload[:cr], "\r"
    return payload[:lf], "\n"


def parse_header(payload: bytes, *, strict_terminators: bool = False) -> Header:
    """Read MSH from a raw payload or raise :class:`HeaderError` saying why not."""
    # Windows senders sometimes prefix a UTF-8 byte order mark; it is not content.
    body = payload.removeprefix(b"\xef\xbb\xbf").lstrip(b"\r\n\t ")
    if not body.startswith(b"MSH"):
        if b"MSH" in body[:512]:
            raise HeaderError(100, "message does not start with an MSH segment", field="MSH")
        raise HeaderError(100, "no MSH segment: this is not an HL7 v2 message", field="MSH")
    line_bytes, terminator = _first_segment(body)
    if strict_terminators and terminator not in ("\r", ""):
        raise HeaderError(
            100,
            "segments must end with CR (0x0D); this listener is strict about terminators",
            field="MSH",
        )
    # MSH is ASCII by rule (delimiters and codes); latin-1 maps every byte, so a stray
    # non-ASCII byte in a header name cannot stop us from answering.
    line = line_bytes.decode("latin-1")
    if len(line) < 8:
        raise HeaderError(100, "MSH segment is truncated", field="MSH")
    field_sep = line[3]
    if field_sep.isalnum() or field_sep in " \t\r\n":
        raise HeaderError(100, "MSH-1 field separator is missing or invalid", field="MSH-1")
    parts = line.split(field_sep)
    encoding_chars = parts[1]
    if not _valid_encoding_chars(encoding_chars, field_sep):
        raise HeaderError(
            100,
            "MSH-2 encoding characters are invalid "
            "(expected 4 or 5 distinct delimiters like ^~\\&)",
            field="MSH-2",
        )

    def f(n: int) -> str:
        return parts[n - 1] if len(parts) >= n else ""

    rep = encoding_chars[1]
    header = Header(
        field_sep=field_sep,
        encoding_chars=encoding_chars,
        sending_application=f(3),
        sending_facility=f(4),
        receiving_application=f(5),
        receiving_facility=f(6),
        timestamp=f(7),
        message_type=f(9),
        control_id=f(10),
        processing_id=f(11),
        version=f(12).split(encoding_chars[0], 1)[0],
        accept_ack_type=f(15),
        application_ack_type=f(16),
        charset=f(18).split(rep, 1)[0],
        segment_terminator=terminator or "\r",
    )
    if not header.message_type.strip():
        raise HeaderError(101, "MSH-9 message type is required", field="MSH-9")
    if not header.control_id.strip():
        raise HeaderError(101, "MSH-10 message control ID is required", field="MSH-10")
    return header


def _valid_encoding_chars(chars: str, field_sep: str) -> bool:
    if len(chars) not in (4, 5):
        return False
    if len(set(chars)) != len(chars) or field_sep in chars:
        return False
    return not any(c.isalnum() or c in " \t\r\n" for c in chars)


def ascii_compatible(codec: str) -> bool:
    """True for a text codec that writes the HL7 delimiters and MLLP framing as ASCII.

    ``str.encode`` accepts text encodings only: ``hex`` or ``rot13`` pass
    ``codecs.lookup`` but could never decode a message.
    """
    try:
        return "MSH|^~\\&\x0b\x1c\r".encode(codec) == b"MSH|^~\\&\x0b\x1c\r"
    except LookupError:
        return False


def codec_for(charset: str, default: str) -> str:
    """Python codec for MSH-18 (or the listener default when MSH-18 is empty).

    Table 0211 names first, then vendor spellings Python knows (``ISO-8859-1``,
    ``windows-1252``). Raises :class:`HeaderError` 103 for a name neither knows, or
    for an encoding that cannot travel over MLLP (UTF-16/32: frame bytes collide).
    """
    name = charset.strip()
    if not name:
        return default
    codec = CHARSETS.get(name.upper())
    if codec is not None:
        return codec
    if ascii_compatible(name):
        return codecs.lookup(name).name
    if "16" in name or "32" in name:
        reason = "MSH-18 names UTF-16/UTF-32, which cannot be carried over MLLP; send UTF-8"
    else:
        reason = "MSH-18 names a character set refloop does not know (HL7 table 0211)"
    raise HeaderError(103, reason, field="MSH-18")


def decode(payload: bytes, codec: str) -> str:
    """Decode the whole message; raises :class:`HeaderError` (code 102) with the offset."""
    try:
        return payload.decode(codec)
    except UnicodeDecodeError as exc:
        raise HeaderError(
            102,
            f"message bytes are not valid {codecs.lookup(codec).name} "
            f"(first bad byte at offset {exc.start}); set MSH-18 or the listener's "
            "default_charset",
            field="MSH-18",
        ) from exc


def split_segments(text: str) -> list[str]:
    """Segments of a decoded message, accepting CR, LF or CRLF terminators."""
    return [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s]


def escape(text: str, field_sep: str = "|", encoding_chars: str = "^~\\&") -> str:
    """Escape text for use inside a field, per HL7 v2 §2.7 (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\)."""
    comp, rep, esc, sub = encoding_chars[0], encoding_chars[1], encoding_chars[2], encoding_chars[3]
    out = text.replace(esc, f"{esc}E{esc}")
    for ch, code in ((field_sep, "F"), (comp, "S"), (sub, "T"), (rep, "R")):
        out = out.replace(ch, f"{esc}{code}{esc}")
    return out.replace("\r", " ").replace("\n", " ")
