"""Copying fields and OBX segments out of stored source messages into v2.5.1 (pure).

Theory of operation
-------------------
:class:`Source` reads a stored message (``ctx.sources``) with the engine's lazy model and
re-encodes each field it copies for our delimiters, trimmed to the v2.5.1 shape of the
target field (repetitions, components, subcomponents from hl7apy's reference): a v2.3
or v2.8 sender's extra components never reach hl7apy's STRICT check.

:func:`copy_obx` re-emits OBX segments of chosen value types. hl7apy types OBX-5
(``varies``) as ST whatever OBX-2 says, so a 300-character TX line or a base64 ED would
fail its 199-character ST limit: OBX-5 is checked here against OBX-2 instead, and a
stand-in is what hl7apy sees (:attr:`~engine.outbound.packets.hl7v2_er7.Seg.stand_in`).
"""

from __future__ import annotations

import re
from functools import lru_cache

from hl7apy import load_reference

from engine.outbound.model import PacketContext, RenderError
from engine.outbound.packets.hl7source import source_message
from engine.outbound.packets.hl7v2_er7 import (
    VERSION,
    D,
    Er7,
    Seg,
    comps,
    join,
    literal,
    subs,
    text,
)
from engine.protocol.hl7message import Message
from engine.protocol.hl7message import Segment as SourceSegment


@lru_cache(maxsize=64)
def shape(segment: str) -> dict[int, tuple[int, tuple[int, ...] | None]]:
    """Per field of a v2.5.1 segment: (max repetitions, subcomponents per component)
    from hl7apy's reference; ``None`` components for ``varies`` (OBX-5: not trimmed)."""
    out: dict[int, tuple[int, tuple[int, ...] | None]] = {}
    for number, (_, ref, card, _kind) in enumerate(
        load_reference(segment, "Segment", VERSION)[1], 1
    ):
        if ref[0] == "leaf":
            arity: tuple[int, ...] | None = None if ref[2] == "varies" else (1,)
        else:
            arity = tuple(1 if child[1][0] == "leaf" else len(child[1][1]) for child in ref[1])
        out[number] = (card[1], arity)
    return out


_DELIMITER_ESCAPES = {
    "F": "field",
    "S": "component",
    "T": "subcomponent",
    "R": "repetition",
    "E": "escape",
}
_ESCAPE_SEQUENCE = re.compile(
    r"[HN]|X(?:[0-9A-Fa-f]{2})+|Z[^\\]*|C[0-9A-Fa-f]{4}|M[0-9A-Fa-f]{4,6}"
    r"|\.(?:br|fi|nf|ce|(?:sp|in|ti|sk)(?: ?[+-]?[0-9]+)?)"
)


class Source:
    """A stored message (``ctx.sources``) read with the engine's lazy model, its fields
    re-encoded for our delimiters and trimmed to the v2.5.1 shape of the target field."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self.delims = message.delims

    @classmethod
    def load(cls, ctx: PacketContext, key: str) -> Source | None:
        """The stored message ``key``; None when the delivery has none. Unlike the FHIR
        and document renderers, a v2 packet that cannot read its source says so."""
        message = source_message(ctx, key)
        if message is None and ctx.sources.get(key):
            raise RenderError(f"sources.{key}: not a readable HL7 v2 message")
        return None if message is None else cls(message)

    @property
    def message_code(self) -> str:
        msh = self.message.segments[0]
        raw = msh.field(9) or ""
        return raw.split(self.delims.component)[0]

    def all(self, name: str) -> list[SourceSegment]:
        return self.message.all(name)

    def value(self, seg: SourceSegment, n: int) -> str:
        """Field ``n``, first repetition and component, unescaped ("" when absent)."""
        raw = seg.field(n) or ""
        first = raw.split(self.delims.repetition)[0].split(self.delims.component)[0]
        first = first.split(self.delims.subcomponent)[0]
        return "" if first == '""' else self.message.unescape(first)

    def field(self, seg: SourceSegment, n: int, *, target: str | None = None) -> Er7 | None:
        """Field ``n`` of ``seg`` as our ER7, trimmed to field ``n`` of ``target`` (v2.5.1)."""
        raw = seg.field(n)
        if not raw or raw == '""':
            return None
        max_reps, arity = shape(target or seg.name).get(n, (0, (1,)))
        if max_reps == 0:
            return None
        d = self.delims
        out_reps: list[Er7 | None] = []
        for rep in raw.split(d.repetition)[: None if max_reps < 0 else max_reps]:
            components = rep.split(d.component)
            if arity is not None:
                components = components[: len(arity)]
            out_comps: list[Er7 | None] = []
            for i, comp in enumerate(components):
                pieces = comp.split(d.subcomponent)
                if arity is not None:
                    pieces = pieces[: arity[i]]
                out_comps.append(subs(*(self._leaf(p) for p in pieces)))
            out_reps.append(comps(*out_comps))
        return join(D.repetition, out_reps)

    def _leaf(self, raw: str) -> Er7 | None:
        """One leaf's text in our encoding. ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` stand for the
        *source's* delimiter characters, so they are resolved and re-escaped for ours; the
        other sequences (hex, formatting, highlighting) are kept; our delimiters in plain
        text are escaped, and so is a stray escape character."""
        if not raw:
            return None
        esc = self.delims.escape
        out: list[str] = []
        i = 0
        while i < len(raw):
            j = raw.find(esc, i)
            if j < 0:
                out.append(str(text(raw[i:]) or ""))
                break
            out.append(str(text(raw[i:j]) or ""))
            end = raw.find(esc, j + 1)
            seq = raw[j + 1 : end] if end > j else ""
            if end > j and seq in _DELIMITER_ESCAPES:
                out.append(str(text(getattr(self.delims, _DELIMITER_ESCAPES[seq]))))
                i = end + 1
            elif end > j and _ESCAPE_SEQUENCE.fullmatch(seq):
                out.append(f"\\{seq}\\")
                i = end + 1
            else:
                out.append("\\E\\")
                i = j + 1
        return Er7("".join(out)) if out else None


#: OBX-2 value types of table 0125 (v2.5.1) that a copied OBX may carry.
VALUE_TYPES = frozenset(
    "AD CE CF CK CN CP CWE CX DT DTM ED FT MO NM PN RP SN ST TM TN TS TX".split()
    + "XAD XCN XON XPN XTN".split()
)
NOTE_TYPES = frozenset({"TX", "FT", "ST", "ED"})
_TEXT_LIMIT = 65536  # TX and FT in v2.5.1
_DTM = re.compile(r"[0-9]{4}(?:[0-9]{2}){0,5}(?:\.[0-9]{1,4})?(?:[+-][0-9]{4})?")


def copy_obx(
    source: Source,
    *,
    types: frozenset[str],
    default_code: Er7 | None = None,
    default_status: str = "F",
) -> list[Seg]:
    """The source's OBX segments of the given value types, renumbered, with the fields a
    receiver needs (2 type, 3 identifier, 4 sub-id, 5 value, 6 units, 11 status, 14 time).
    OBX-3 and OBX-11 are required: ``default_code`` / ``default_status`` fill them in."""
    out: list[Seg] = []
    for seg in source.all("OBX"):
        kind = source.value(seg, 2)
        if kind not in types:
            continue
        value = source.field(seg, 5)
        if not value:
            continue
        obx = Seg("OBX").set(1, literal(str(len(out) + 1))).set(2, literal(kind)).set(5, value)
        if not _check_value(kind, value, len(out) + 1):
            continue
        obx.stand_in[5] = literal("x")
        obx.set(3, source.field(seg, 3) or default_code)
        obx.set(4, source.field(seg, 4))
        obx.set(6, source.field(seg, 6))
        status = source.value(seg, 11)
        obx.set(11, literal(status if status in _RESULT_STATUS else default_status))
        observed = source.field(seg, 14)
        if observed and _DTM.fullmatch(observed.split("^")[0]):
            obx.set(14, observed)
        out.append(obx)
    return out


_RESULT_STATUS = frozenset("C D F I N O P R S U W X".split())


def _check_value(kind: str, value: Er7, n: int) -> bool:
    """What hl7apy cannot check in OBX-5 (it types ``varies`` as ST). An ED without
    data or with an encoding outside table 0299 carries nothing readable: skipped."""
    if kind in ("TX", "FT") and any(len(r) > _TEXT_LIMIT for r in value.split(D.repetition)):
        raise RenderError(f"OBX-5: the {kind} value of OBX {n} exceeds {_TEXT_LIMIT} characters")
    if kind == "ED":
        for rep in value.split(D.repetition):
            parts = rep.split(D.component)
            if len(parts) < 5 or parts[3].lower() not in ("a", "hex", "base64") or not parts[4]:
                return False
    return True
