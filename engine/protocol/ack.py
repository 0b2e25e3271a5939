"""Building HL7 v2 acknowledgements (pure).

Original mode answers AA / AE / AR; enhanced mode (MSH-15 or MSH-16 valued) answers
the accept acknowledgement CA / CE / CR. Every error or reject carries an ERR segment
with an HL7 table 0357 code and a reason a person can act on. Reasons never quote
message content, so a NAK cannot leak PHI to a peer or into a log.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from functools import lru_cache

from engine.protocol.hl7v2 import Header, escape


class Outcome(Enum):
    ACCEPT = "accept"
    ERROR = "error"
    REJECT = "reject"


_ORIGINAL = {Outcome.ACCEPT: "AA", Outcome.ERROR: "AE", Outcome.REJECT: "AR"}
_ENHANCED = {Outcome.ACCEPT: "CA", Outcome.ERROR: "CE", Outcome.REJECT: "CR"}

#: HL7 table 0357 (message error condition codes) — the ones refloop sends.
ERROR_CODES: dict[int, str] = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    104: "Value too long",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    207: "Application internal error",
}


@dataclass(frozen=True, slots=True)
class AckError:
    code: int  # table 0357
    reason: str
    field: str = ""  # e.g. "MSH-18", for ERR-2 (error location)
    application_code: str = ""  # ERR-5 from table 0533, e.g. "102^Duplicate key identifier"


_ID_PREFIX = uuid.uuid4().hex[:8]
_ID_COUNTER = itertools.count(1)


def next_control_id() -> str:
    """A control id for an ACK we send: unique per process start (random prefix) and
    within it (counter); 20 characters, because MSH-10 is ST(20) up to v2.6."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


def ack_code(outcome: Outcome, *, enhanced: bool) -> str:
    return (_ENHANCED if enhanced else _ORIGINAL)[outcome]


def wants_accept_ack(header: Header, outcome: Outcome) -> bool:
    """Whether MSH-15 asks for an accept acknowledgement in this outcome (table 0155)."""
    condition = header.accept_ack_type.strip().upper() or "AL"
    if condition == "NE":
        return False
    if condition == "ER":
        return outcome is not Outcome.ACCEPT
    if condition == "SU":
        return outcome is Outcome.ACCEPT
    return True


def hl7_timestamp(moment: datetime) -> str:
    """``YYYYMMDDHHMMSS+ZZZZ`` (DTM) from an aware datetime."""
    return _timestamp(moment.replace(microsecond=0))


@lru_cache(maxsize=64)
def _timestamp(moment: datetime) -> str:
    # Formatting with %z through a ZoneInfo costs more than the rest of an ACK; under
    # load many ACKs share a second.
    return moment.strftime("%Y%m%d%H%M%S%z")


def build_ack(
    header: Header | None,
    code: str,
    *,
    control_id: str,
    now: datetime,
    error: AckError | None = None,
    charset_codec: str = "ascii",
) -> bytes:
    """Build an ACK for ``header`` (or a bare one when no header could be read).

    The ACK's MSH swaps sender and receiver, echoes MSH-1/MSH-2, MSH-11, MSH-12 and
    MSH-18, and MSA-2 echoes MSH-10. Segments end with CR.
    """
    fs = header.field_sep if header else "|"
    enc = header.encoding_chars if header else "^~\\&"
    comp = enc[0]
    sub = enc[3]
    version = header.version if header and header.version else "2.5.1"
    trigger = header.trigger_event if header else ""
    msh = [
        "MSH",
        enc,
        header.receiving_application if header else "REFLOOP",
        header.receiving_facility if header else "",
        header.sending_application if header else "",
        header.sending_facility if header else "",
        hl7_timestamp(now),
        "",
        _ack_type(trigger, comp, version),
        control_id,
        header.processing_id if header and header.processing_id else "P",
        version,
    ]
    if header and header.enhanced_mode:
        # An acknowledgement is never itself acknowledged.
        msh += ["", "", "NE", "NE"]
    if header and header.charset:
        msh += [""] * (17 - len(msh)) + [header.charset]
    msa = ["MSA", code, header.control_id if header else ""]
    if error is not None and _version(version) < (2, 7):
        # MSA-3 (text message) was withdrawn in v2.7; from then on ERR-8 alone says why.
        msa.append(escape(error.reason, fs, enc))
    segments = [fs.join(msh), fs.join(msa)]
    if error is not None:
        segments.append(_err_segment(error, version, fs, enc, comp, sub))
    text = "\r".join(segments) + "\r"
    return text.encode(charset_codec, errors="replace")


def _err_segment(error: AckError, version: str, fs: str, enc: str, comp: str, sub: str) -> str:
    name = ERROR_CODES.get(error.code, "Application error")
    reason = escape(error.reason, fs, enc)
    seg, _, field = error.field.partition("-")
    if _version(version) < (2, 5):
        # v2.1 to 2.4: ERR-1 is ELD — segment ^ sequence ^ field ^ code&text&table.
        location = f"{seg}{comp}1{comp}{field}{comp}" if seg else f"{comp}{comp}{comp}"
        return fs.join(["ERR", f"{location}{error.code}{sub}{name}{sub}HL70357"])
    location = f"{seg}{comp}1{comp}{field}" if seg else ""
    app = f"{error.application_code}{comp}HL70533" if error.application_code else ""
    return fs.join(
        ["ERR", "", location, f"{error.code}{comp}{name}{comp}HL70357", "E", app, "", "", reason]
    )


def _ack_type(trigger: str, comp: str, version: str) -> str:
    if not trigger:
        return "ACK"
    # MSH-9.3 (message structure) exists from v2.3.1 on; earlier MSH-9 has two parts.
    if _version(version) < (2, 3, 1):
        return f"ACK{comp}{trigger}"
    return f"ACK{comp}{trigger}{comp}ACK"


def _version(version: str) -> tuple[int, ...]:
    """``2.5.1`` → (2, 5, 1); anything unreadable counts as 2.5.1, the common default."""
    try:
        parts = tuple(int(p) for p in version.strip().split("."))
    except ValueError:
        return (2, 5, 1)
    return parts if len(parts) >= 2 else (2, 5, 1)
