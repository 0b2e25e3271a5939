"""Shared machinery of the HL7 v2 renderers (pure): canonical reads, common segments, finish.

Theory of operation
-------------------
A renderer reads the referral through :class:`Data`, builds :class:`Seg` lists whose
fields are ER7 text made only by the encoders of :mod:`~engine.outbound.packets.hl7v2_er7`
(escaping, datatypes) or copied from a stored message by
:mod:`~engine.outbound.packets.hl7v2_copy`, and hands them to :func:`finish`.

:func:`finish` adds the MSH, has :func:`~engine.outbound.packets.hl7v2_validate.validate`
check the message with hl7apy (v2.5.1, STRICT) and serialises it with ``\\r`` segment
ends. What hl7apy accepted is exactly what goes out (the bytes are ours, not hl7apy's
``to_er7``).

Reasons in :class:`RenderError` name a field (``PID-3``) or a canonical field
(``patient.identifier``), never a value. This module also re-exports the encoders,
copying and validation, so a renderer imports from one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from engine.outbound.model import PacketContext, Rendered, RenderError
from engine.outbound.packets.hl7v2_copy import (
    NOTE_TYPES,
    VALUE_TYPES,
    Source,
    copy_obx,
    shape,
)
from engine.outbound.packets.hl7v2_er7 import (
    SYSTEMS,
    VERSION,
    D,
    Er7,
    Seg,
    ce,
    comps,
    cx,
    ei,
    hd,
    join,
    literal,
    subs,
    table_ce,
    text,
    ts,
    xcn,
    xpn,
)
from engine.outbound.packets.hl7v2_validate import validate

CONTENT_TYPE = "x-application/hl7-v2+er7"

# -- reading the canonical data ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Data:
    """Typed reads of the referral projection and the trigger event. A value of the wrong
    shape (or :data:`~engine.domain.events.CLEAR`) reads as absent."""

    ctx: PacketContext

    def raw(
        self, name: str, *, group: str = "referral", event: bool = False, anywhere: bool = False
    ) -> Any:
        """A field from the trigger event (``event``), then ``group``, then (``anywhere``:
        identifiers such as ``correlate.*`` land in whichever group learned them) the
        other groups in name order."""
        if event:
            found = self.ctx.event.fields.get(name)
            if found is not None:
                return found
        data = self.ctx.referral.data
        groups = [group, *(g for g in sorted(data) if g != group)] if anywhere else [group]
        for g in groups:
            found = data.get(g, {}).get(name)
            if found is not None:
                return found
        return None

    def text(self, name: str, **kw: Any) -> str | None:
        found = self.raw(name, **kw)
        if isinstance(found, str) and found:
            return found
        if isinstance(found, Mapping) and isinstance(found.get("code"), str) and found["code"]:
            return str(found["code"])
        return None

    def ident(self, name: str, **kw: Any) -> Mapping[str, Any] | None:
        found = self.raw(name, **kw)
        if isinstance(found, Mapping) and isinstance(found.get("value"), str) and found["value"]:
            return found
        return None

    def coding(self, name: str, **kw: Any) -> Mapping[str, Any] | None:
        found = self.raw(name, **kw)
        if isinstance(found, Mapping) and (found.get("code") or found.get("display")):
            return found
        return None

    def name(self, name: str, **kw: Any) -> Mapping[str, Any] | None:
        found = self.raw(name, **kw)
        if isinstance(found, Mapping) and any(
            isinstance(found.get(k), str) and found[k] for k in ("family", "given", "middle")
        ):
            return found
        return None

    def when(self, name: str, **kw: Any) -> datetime | None:
        found = self.raw(name, **kw)
        if found is None or isinstance(found, Mapping):
            return None
        try:
            return datetime.fromisoformat(str(found))
        except ValueError:
            raise RenderError(f"{name}: not an ISO 8601 date/time") from None

    def day(self, name: str, **kw: Any) -> date | None:
        found = self.raw(name, **kw)
        if found is None or isinstance(found, Mapping):
            return None
        try:
            return date.fromisoformat(str(found)[:10])
        except ValueError:
            raise RenderError(f"{name}: not an ISO 8601 date") from None


# -- common segments ---------------------------------------------------------------------------


def pid(data: Data) -> Seg:
    """PID from the canonical patient; PID-3 and PID-5 are required in v2.5.1."""
    ident = data.ident("patient.identifier", anywhere=True)
    if ident is None:
        raise RenderError("PID-3: the referral has no patient identifier (patient.identifier)")
    name = data.name("patient.name", anywhere=True)
    if name is None:
        raise RenderError("PID-5: the referral has no patient name (patient.name)")
    return (
        Seg("PID")
        .set(1, literal("1"))
        .set(3, cx(ident))
        .set(5, xpn(name))
        .set(7, ts(data.day("patient.birth_date", anywhere=True)))
        .set(8, _SEX.get(data.text("patient.sex", anywhere=True) or ""))
    )


#: Canonical sex back to HL7 table 0001.
_SEX = {
    "female": literal("F"),
    "male": literal("M"),
    "other": literal("O"),
    "unknown": literal("U"),
}


def nte(n: int, comment: str, *, source: str) -> Seg:
    """NTE: set id, source of comment (table 0105: P placer, L filler), FT text."""
    return (
        Seg("NTE")
        .set(1, literal(str(n)))
        .set(2, literal(source))
        .set(3, text(comment, formatted=True))
    )


def placer(data: Data) -> Mapping[str, Any] | None:
    return data.ident("correlate.placer_order", anywhere=True)


def filler(data: Data) -> Mapping[str, Any] | None:
    return data.ident("correlate.filler_order", anywhere=True)


# -- finishing: MSH, validation, bytes -----------------------------------------------------------


def msh(ctx: PacketContext, message_type: str, *, ack: tuple[str, str] = ("AL", "NE")) -> Seg:
    return (
        Seg("MSH")
        .set(3, hd(ctx.sender.application))
        .set(4, hd(ctx.sender.facility))
        .set(5, hd(ctx.receiver.application))
        .set(6, hd(ctx.receiver.facility))
        .set(7, ts(ctx.now))
        .set(9, literal(message_type))
        .set(10, text(ctx.control_id))
        .set(11, literal("P"))
        .set(12, literal(VERSION))
        .set(15, literal(ack[0]))
        .set(16, literal(ack[1]))
    )


def finish(ctx: PacketContext, header: Seg, body: list[Seg]) -> Rendered:
    """Serialise, validate with hl7apy (v2.5.1, STRICT), return the payload."""
    if not ctx.control_id:
        raise RenderError("MSH-10: the delivery has no control id")
    segments = [header, *body]
    if not all(value.isascii() for seg in segments for value in seg.fields.values()):
        header.set(18, literal("UNICODE UTF-8"))
    validate(segments)
    payload = "\r".join(seg.er7() for seg in segments)
    message_type = "^".join(header.fields[9].split("^")[:2])
    return Rendered(
        payload=payload.encode("utf-8"),
        content_type=CONTENT_TYPE,
        metadata={"control_id": ctx.control_id, "message_type": message_type},
    )


__all__ = [
    "CONTENT_TYPE",
    "NOTE_TYPES",
    "SYSTEMS",
    "VALUE_TYPES",
    "VERSION",
    "D",
    "Data",
    "Er7",
    "Seg",
    "Source",
    "ce",
    "comps",
    "copy_obx",
    "cx",
    "ei",
    "filler",
    "finish",
    "hd",
    "join",
    "literal",
    "msh",
    "nte",
    "pid",
    "placer",
    "shape",
    "subs",
    "table_ce",
    "text",
    "ts",
    "validate",
    "xcn",
    "xpn",
]
