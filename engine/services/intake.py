"""What to store and how to answer, for one inbound frame (pure).

The listener calls :func:`assess` on each frame, hands the resulting record to the
writer, and, once the writer says it is committed, sends :func:`ack_for`'s answer. No
clock, socket or database here: ``now`` and the ACK control id come in as values.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from engine.protocol.ack import AckError, Outcome, ack_code, build_ack, wants_accept_ack
from engine.protocol.hl7v2 import Header, HeaderError, codec_for, decode, parse_header

#: HL7 table 0076 (message type). MSH-9.1 outside it is answered AR 200.
MESSAGE_TYPES = frozenset(
    (
        "ACK ADR ADT BAR BPS BRP BRT BTS CCF CCI CCM CCQ CCR CCU CQU CRM CSU DBC "
        "DBU DEL DEO DER DFT DOC DPR DSR EAC EAN EAR EHC ESR ESU INR INU LSR LSU "
        "MDM MFD MFK MFN MFQ MFR NMD NMQ NMR OMB OMD OMG OMI OML OMN OMP OMQ OMS "
        "OPL OPR OPU ORA ORB ORD ORF ORG ORI ORL ORM ORN ORP ORR ORS ORU ORX OSM "
        "OSQ OSR OSU OUL PEX PGL PIN PMU PPG PPP PPR PPT PPV PRR PTR QBP QCK QCN "
        "QRY QSB QSX QVR RAR RAS RCI RCL RDE RDR RDS RDY REF RER RGR RGV ROC ROR "
        "RPA RPI RPL RPR RQA RQC RQI RQP RRA RRD RRE RRG RRI RSP RTB SCN SDN SDR "
        "SIU SLN SLR SMD SQM SQR SRM SRR SSR SSU STC STI SUR TBR TCR TCU UDM VXQ "
        "VXR VXU VXX"
    ).split()
)
# Trigger events in HL7 table 0003 are a letter and two digits (A01, O19, S12, T02, Q22).
_TRIGGER = re.compile(r"^[A-Z][0-9]{2}$")
_LOCAL_TYPE = re.compile(r"^Z[A-Z0-9]{2}$")


def known_message_type(code: str) -> bool:
    """In table 0076, or a site-defined Z type (which the standard reserves for local use)."""
    return code in MESSAGE_TYPES or bool(_LOCAL_TYPE.match(code))


Status = Literal["received", "rejected", "error"]
_STATUS: dict[Outcome, Status] = {
    Outcome.ACCEPT: "received",
    Outcome.REJECT: "rejected",
    Outcome.ERROR: "error",
}
AckMode = Literal["auto", "original", "enhanced"]


@dataclass(frozen=True, slots=True)
class Policy:
    """The listener options that decide intake (from ``[[mllp.listeners]]``)."""

    ack_mode: AckMode = "auto"
    default_charset: str = "utf-8"
    strict_segment_terminators: bool = False
    message_types: frozenset[str] = frozenset()
    duplicate_window: timedelta = timedelta(days=7)
    max_message_bytes: int = 10 * 1024 * 1024
    honour_accept_ack_type: bool = False


@dataclass(frozen=True, slots=True)
class Intake:
    """The verdict on one frame, before it is stored."""

    header: Header | None
    outcome: Outcome
    error: AckError | None
    codec: str
    dedup_key: str | None
    payload_sha256: str

    @property
    def status(self) -> Status:
        """The stored status: received, rejected (AR/CR) or error (AE/CE)."""
        return _STATUS[self.outcome]

    @property
    def type_label(self) -> str:
        """A bounded metric label: ``ORM^O01``, ``Z^local`` or ``invalid``.

        Bounded by the tables, not by what a peer sends: table 0076 types times
        letter-and-two-digit triggers; site-defined Z types share one label.
        """
        h = self.header
        if h is None or not known_message_type(h.message_code):
            return "invalid"
        if h.message_code.startswith("Z"):
            return "Z^local"
        trigger = h.trigger_event
        if not trigger:
            return h.message_code
        return h.type_label if _TRIGGER.match(trigger) else f"{h.message_code}^invalid"

    def enhanced(self, mode: AckMode) -> bool:
        if mode == "original":
            return False
        if mode == "enhanced":
            return True
        return self.header is not None and self.header.enhanced_mode


def assess(payload: bytes, policy: Policy) -> Intake:
    digest = hashlib.sha256(payload).hexdigest()
    try:
        header = parse_header(payload, strict_terminators=policy.strict_segment_terminators)
    except HeaderError as exc:
        return _refused(None, Outcome.REJECT, exc, digest, "ascii")
    try:
        codec = codec_for(header.charset, policy.default_charset)
    except HeaderError as exc:
        return _refused(header, Outcome.ERROR, exc, digest, "latin-1")
    undecodable: HeaderError | None = None
    try:
        decode(payload, codec)
    except HeaderError as exc:
        # The header stays latin-1 text; answering in latin-1 echoes its bytes unchanged.
        undecodable, codec = exc, "latin-1"
    else:
        header = header.recoded(codec)
    code = header.message_code
    if not known_message_type(code):
        err = HeaderError(
            200, "MSH-9.1 is not a message type in HL7 table 0076 (or a local Zxx)", field="MSH-9"
        )
        return _refused(header, Outcome.REJECT, err, digest, codec)
    if policy.message_types and code not in policy.message_types:
        err = HeaderError(200, f"this listener does not accept {code} messages", field="MSH-9")
        return _refused(header, Outcome.REJECT, err, digest, codec)
    if undecodable is not None:
        return _refused(header, Outcome.ERROR, undecodable, digest, codec)
    return Intake(
        header=header,
        outcome=Outcome.ACCEPT,
        error=None,
        codec=codec,
        dedup_key=dedup_key(header),
        payload_sha256=digest,
    )


def assess_oversize(prefix: bytes, size: int, policy: Policy) -> Intake:
    """A frame over ``max_message_bytes``: rejected, answered from its header if readable."""
    digest = hashlib.sha256(prefix).hexdigest()
    try:
        header: Header | None = parse_header(prefix)
    except HeaderError:
        header = None
    err = HeaderError(
        104,
        f"message is {size} bytes; this listener accepts at most "
        f"{policy.max_message_bytes} (max_message_bytes)",
    )
    return _refused(header, Outcome.REJECT, err, digest, "latin-1")


def _refused(
    header: Header | None, outcome: Outcome, exc: HeaderError, digest: str, codec: str
) -> Intake:
    return Intake(
        header=header,
        outcome=outcome,
        error=AckError(exc.code, exc.reason, exc.field),
        codec=codec,
        dedup_key=None,
        payload_sha256=digest,
    )


def dedup_key(header: Header) -> str:
    """Same sender (MSH-3, MSH-4) and control id (MSH-10) → same key."""
    basis = "\x1f".join((header.sending_application, header.sending_facility, header.control_id))
    return hashlib.sha256(basis.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Answer:
    code: str  # MSA-1
    ack: bytes | None  # None when MSH-15 asks for no accept acknowledgement


def ack_for(
    intake: Intake,
    mode: AckMode,
    *,
    control_id: str,
    now: datetime,
    honour_accept_ack_type: bool = False,
) -> Answer:
    """The acknowledgement for this intake.

    By default every frame is answered, whatever MSH-15 says: on MLLP a sender that
    waits for an answer and gets silence times out and resends, and one that asked for
    none ignores it. A listener may honour MSH-15 (NE/ER/SU) to the letter instead.
    """
    enhanced = intake.enhanced(mode)
    code = ack_code(intake.outcome, enhanced=enhanced)
    if (
        honour_accept_ack_type
        and enhanced
        and intake.header is not None
        and not wants_accept_ack(intake.header, intake.outcome)
    ):
        return Answer(code, None)
    ack = build_ack(
        intake.header,
        code,
        control_id=control_id,
        now=now,
        error=intake.error,
        charset_codec=intake.codec,
    )
    return Answer(code, ack)


def storage_failure_ack(intake: Intake, mode: AckMode, *, control_id: str, now: datetime) -> bytes:
    """Answer when the message could not be committed: reject, so the sender retries."""
    return build_ack(
        intake.header,
        ack_code(Outcome.REJECT, enhanced=intake.enhanced(mode)),
        control_id=control_id,
        now=now,
        error=_NOT_STORED,
        charset_codec=intake.codec,
    )


_NOT_STORED = AckError(207, "refloop could not store the message; resend it later")


_HEADER_TEXT = (
    "message_type",
    "control_id",
    "sending_application",
    "sending_facility",
    "receiving_application",
    "receiving_facility",
    "version",
    "charset",
)


def record(
    intake: Intake,
    *,
    payload: bytes,
    listener: str,
    peer: str,
    received_at: datetime,
    answer: Answer,
    size: int | None = None,
) -> dict[str, Any]:
    """The ``messages`` row for this frame."""
    h = intake.header
    if h is not None and any("\x00" in getattr(h, k) for k in _HEADER_TEXT):
        # PostgreSQL text cannot hold NUL; the raw bytes (bytea) keep it untouched.
        h = replace(h, **{k: getattr(h, k).replace("\x00", "\ufffd") for k in _HEADER_TEXT})
    return {
        "received_at": received_at,
        "listener": listener,
        "peer": peer,
        "raw": payload,
        "size": len(payload) if size is None else size,
        "raw_truncated": size is not None and size > len(payload),
        "message_type": h.message_type if h else None,
        "control_id": h.control_id if h else None,
        "sending_application": h.sending_application if h else None,
        "sending_facility": h.sending_facility if h else None,
        "receiving_application": h.receiving_application if h else None,
        "receiving_facility": h.receiving_facility if h else None,
        "version": h.version if h else None,
        "charset": h.charset if h and h.charset else None,
        "dedup_key": intake.dedup_key,
        "payload_sha256": intake.payload_sha256,
        "status": intake.status,
        "ack_code": answer.code if answer.ack is not None else None,
        "ack": answer.ack,
        "error_code": intake.error.code if intake.error else None,
        "error": intake.error.reason if intake.error else None,
        "duplicate_of": None,
    }


def same_content(a: bytes, b: bytes) -> bool:
    """Equal except MSH-7 (senders that resend after a lost ACK may restamp it)."""
    return _without_msh7(a) == _without_msh7(b)


def _without_msh7(payload: bytes) -> bytes:
    body = payload.removeprefix(b"\xef\xbb\xbf").lstrip(b"\r\n\t ")
    end = len(body)
    for terminator in (b"\r", b"\n"):
        pos = body.find(terminator)
        if 0 <= pos < end:
            end = pos
    line, rest = body[:end], body[end:]
    if len(line) < 4:
        return body
    parts = line.split(line[3:4])
    if len(parts) > 6:
        parts[6] = b""
    return line[3:4].join(parts) + rest.replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def conflict_answer(
    row: dict[str, Any], original_raw: bytes, original_id: int, *, control_id: str
) -> dict[str, Any] | None:
    """Row updates for a resend whose content differs from the message it repeats.

    Same sender and MSH-10 but other content is not a duplicate: it is rejected (AR/CR
    207, ERR-5 0533^102 duplicate key) so the sender's team hears about it, and stored
    so nothing is lost. Returns None when it is a genuine duplicate.
    """
    if same_content(row["raw"], original_raw):
        return None
    try:
        header: Header | None = parse_header(row["raw"])
    except HeaderError:
        header = None
    enhanced = row["ack_code"] in ("CA", "CE", "CR") or bool(header and header.enhanced_mode)
    code = ack_code(Outcome.REJECT, enhanced=enhanced)
    error = AckError(
        207,
        f"MSH-10 was already used by this sender for message {original_id} with different "
        "content; send new messages with new control ids",
        field="MSH-10",
        application_code="102^Duplicate key identifier",
    )
    try:
        codec = codec_for(header.charset if header else "", "utf-8")
    except HeaderError:
        codec = "latin-1"
    nak = build_ack(
        header,
        code,
        control_id=control_id,
        now=row["received_at"],
        error=error,
        charset_codec=codec,
    )
    return {
        "status": "rejected",
        "ack": nak,
        "ack_code": code,
        "error_code": error.code,
        "error": error.reason,
    }
