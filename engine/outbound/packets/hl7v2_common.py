"""Shared machinery of the HL7 v2 renderers (pure): encode, copy, validate, serialise.

Theory of operation
-------------------
A renderer builds a list of :class:`Seg` — a segment name and its fields by number —
where every field is already ER7 text (:data:`Er7`). The only ways to make ``Er7`` are
the encoders below (:func:`text`, :func:`ei`, :func:`cx`, :func:`ts` …), which escape every
value, and :class:`Source`, which copies fields out of a stored message. So an
unescaped value cannot reach a field by accident; mypy keeps it so.

:func:`finish` adds the MSH, serialises with ``\\r`` segment ends, and has hl7apy parse
the text back at ``STRICT`` validation with group finding, then ``validate()`` it: the
structure, required fields and cardinalities, datatypes, lengths and DTM formats of
v2.5.1. What hl7apy accepted is exactly what goes out (the bytes are ours, not hl7apy's
``to_er7``).

Why not set values through hl7apy's API: assigning a string parses it as ER7 (so ``^``
in a name splits it), escaping happens only for datatype objects, line breaks are never
escaped, and hl7apy re-escapes its own output (``\\.br\\`` becomes ``\\E\\.br\\E\\``). And
one hl7apy limitation is worked around: it types OBX-5 (``varies``) as ST whatever OBX-2
says, so a 300-character TX line or a base64 ED would fail its 199-character ST limit.
OBX-5 is therefore checked here against OBX-2 and stubbed in the text hl7apy sees.

Reasons in :class:`RenderError` name a field (``PID-3``) or a canonical field
(``patient.identifier``), never a value; hl7apy's exception texts are reduced to element
names, and when an exception names none the failing field is found by re-parsing each
field on its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from typing import Any, NewType

from hl7apy import load_reference
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_field, parse_message
from hl7apy.validation import Validator

from engine.outbound.model import PacketContext, Rendered, RenderError
from engine.protocol.hl7message import Delimiters, Message
from engine.protocol.hl7message import Segment as SourceSegment
from engine.protocol.hl7v2 import HeaderError

VERSION = "2.5.1"
CONTENT_TYPE = "x-application/hl7-v2+er7"

#: ER7 text, escaped for the standard delimiters ``|^~\\&``.
Er7 = NewType("Er7", str)

D = Delimiters()  # ours: | ^ ~ \ &

_ESCAPES = {
    ord("\\"): "\\E\\",
    ord("|"): "\\F\\",
    ord("^"): "\\S\\",
    ord("&"): "\\T\\",
    ord("~"): "\\R\\",
    # Control characters would end a segment (CR) or an MLLP frame (VT, FS): hex escapes.
    **{c: f"\\X{c:02X}\\" for c in range(0x20) if c not in (0x0A, 0x0D)},
}
_PLAIN = str.maketrans({**_ESCAPES, 0x0A: "\\X0A\\", 0x0D: "\\X0D\\"})
_FORMATTED = str.maketrans({**_ESCAPES, 0x0A: "\\.br\\", 0x0D: "\\.br\\"})


def text(value: str | None, *, formatted: bool = False) -> Er7 | None:
    """Escape a value (v2 §2.7). ``formatted`` (FT fields): line breaks become ``\\.br\\``;
    elsewhere they are hex escapes, so a CR never ends a segment early."""
    if not value:
        return None
    if formatted:
        value = value.replace("\r\n", "\n")
        return Er7(value.translate(_FORMATTED))
    return Er7(value.translate(_PLAIN))


def literal(value: str) -> Er7:
    """A constant of ours (a code from an HL7 table): no delimiters to escape."""
    return Er7(value)


def join(sep: str, parts: Sequence[Er7 | None]) -> Er7 | None:
    """Join parts with a delimiter, dropping trailing empty ones (v2 §2.5.3)."""
    out = [p or "" for p in parts]
    while out and not out[-1]:
        out.pop()
    return Er7(sep.join(out)) if out else None


def comps(*parts: Er7 | None) -> Er7 | None:
    return join(D.component, parts)


def subs(*parts: Er7 | None) -> Er7 | None:
    return join(D.subcomponent, parts)


# -- canonical values -> datatypes ---------------------------------------------------------

_OID = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+")


def _assigner(namespace: str, sep: str) -> Er7 | None:
    """HD: a namespace id, or an OID as universal id with type ISO (360X style)."""
    if not namespace:
        return None
    if _OID.fullmatch(namespace):
        return join(sep, [None, text(namespace), literal("ISO")])
    return text(namespace)


def hd(namespace: str | None) -> Er7 | None:
    """HD as a field (MSH-3/4/5/6)."""
    return _assigner(namespace or "", D.component)


def ei(ident: Mapping[str, Any] | None) -> Er7 | None:
    """EI: entity id ^ namespace id (or ^^universal id^ISO for an OID)."""
    if not ident:
        return None
    namespace = str(ident.get("namespace") or "")
    if _OID.fullmatch(namespace):
        return comps(text(str(ident["value"])), None, text(namespace), literal("ISO"))
    return comps(text(str(ident["value"])), text(namespace))


def cx(ident: Mapping[str, Any] | None) -> Er7 | None:
    """CX: id ^^^ assigning authority (HD in subcomponents) ^ identifier type."""
    if not ident:
        return None
    return comps(
        text(str(ident["value"])),
        None,
        None,
        _assigner(str(ident.get("namespace") or ""), D.subcomponent),
        text(str(ident.get("type") or "")),
    )


def xpn(name: Mapping[str, Any] | None) -> Er7 | None:
    if not name:
        return None
    return comps(
        text(_str(name.get("family"))),
        text(_str(name.get("given"))),
        text(_str(name.get("middle"))),
    )


def xcn(ident: Mapping[str, Any] | None, name: Mapping[str, Any] | None) -> Er7 | None:
    """XCN: id ^ family ^ given ^ middle ^^^^^ assigning authority ^^^^ identifier type."""
    if not ident and not name:
        return None
    ident = ident or {}
    name = name or {}
    return comps(
        text(_str(ident.get("value"))),
        text(_str(name.get("family"))),
        text(_str(name.get("given"))),
        text(_str(name.get("middle"))),
        None,
        None,
        None,
        None,
        _assigner(_str(ident.get("namespace")), D.subcomponent),
        None,
        None,
        None,
        text(_str(ident.get("type"))),
    )


#: FHIR code system URIs → HL7 table 0396 names, for codings that came from FHIR.
SYSTEMS = {
    "http://loinc.org": "LN",
    "http://snomed.info/sct": "SCT",
    "http://hl7.org/fhir/sid/icd-10-cm": "I10C",
    "http://hl7.org/fhir/sid/icd-10": "I10",
    "http://www.ama-assn.org/go/cpt": "C4",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
}


def ce(coding: Mapping[str, Any] | None) -> Er7 | None:
    """CE (and the first three components of CWE): code ^ display ^ coding system."""
    if not coding:
        return None
    system = _str(coding.get("system"))
    return comps(
        text(_str(coding.get("code"))),
        text(_str(coding.get("display"))),
        text(SYSTEMS.get(system, system)),
    )


def table_ce(code: str, display: str, table: str) -> Er7:
    """A code of an HL7 table as CE: ``P^Pending^HL70283``."""
    return Er7(f"{code}^{display}^{table}")


def ts(value: datetime | date | None) -> Er7 | None:
    """TS/DTM in the value's own offset (``20261201140000-0600``); a date stays a date."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        return Er7(value.strftime("%Y%m%d"))
    out = value.strftime("%Y%m%d%H%M%S")
    offset = value.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds()) // 60
        sign = "-" if minutes < 0 else "+"
        out += f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return Er7(out)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


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


# -- segments ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Seg:
    """One segment being built: fields by number, each already ER7."""

    name: str
    fields: dict[int, Er7] = field(default_factory=dict)
    # What hl7apy sees instead (OBX-5, see the module docstring).
    stand_in: dict[int, Er7] = field(default_factory=dict)

    def set(self, n: int, value: Er7 | None) -> Seg:
        if value:
            self.fields[n] = value
        else:
            self.fields.pop(n, None)
        return self

    def get(self, n: int) -> Er7 | None:
        return self.fields.get(n)

    def er7(self, *, for_validation: bool = False) -> str:
        values = {**self.fields, **self.stand_in} if for_validation else self.fields
        last = max(values, default=0)
        if self.name == "MSH":
            # MSH-1 is the field separator itself and MSH-2 the encoding characters.
            body = [values.get(n, "") for n in range(3, last + 1)]
            return "|".join(["MSH", "^~\\&", *body])
        return "|".join([self.name, *(values.get(n, "") for n in range(1, last + 1))])


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


# -- copying from stored source messages --------------------------------------------------------


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
        raw = ctx.sources.get(key)
        if not raw:
            return None
        try:
            return cls(Message.parse(raw))
        except HeaderError:
            raise RenderError(f"sources.{key}: not a readable HL7 v2 message") from None

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


_STRICT = VALIDATION_LEVEL.STRICT
_NAME = re.compile(r"(?<![A-Za-z0-9_])([A-Z][A-Z0-9]{2})_([0-9]{1,2})(?![0-9])")
_SEGMENT = re.compile(r"\.([A-Z][A-Z0-9]{2})$")
_COMPLAINTS = (
    ("Missing required child", "required but missing"),
    ("Child limit exceeded", "repeats too often"),
    ("Datatype", "wrong datatype"),
)


def validate(segments: list[Seg]) -> None:
    checked = _distinct(segments)
    text_ = "\r".join(seg.er7(for_validation=True) for seg in checked)
    try:
        message = parse_message(text_, validation_level=_STRICT, find_groups=True)
        Validator.validate(message, reference=_relaxed(message.name))
        # The parser files a segment into its group wherever it stands, and the validator
        # does not look at order; hl7apy's own serialisation follows the structure, so
        # comparing segment names finds a segment out of place.
        ordered = [line[:3] for line in message.to_er7().split("\r")]
    except Exception as exc:  # every hl7apy failure is a validation failure
        raise RenderError(_reason(exc, checked)) from None
    ours = [seg.name for seg in checked]
    if ordered != ours:
        pairs = enumerate(zip(ours, ordered, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(ours), len(ordered)))
        name = ours[at] if at < len(ours) else ordered[at]
        after = f" (after {ours[at - 1]})" if 0 < at <= len(ours) else ""
        raise RenderError(f"{name}: out of place in {message.name}{after}")


def _distinct(segments: list[Seg]) -> list[Seg]:
    """Consecutive OBX that differ only in set id (OBX-5 is stubbed) are one check for
    hl7apy, whose parser costs ~1.5 ms a segment: a 150-line note validates as fast as a
    one-line note. OBX repeat without limit in every structure used here, so leaving
    copies out hides no cardinality error."""
    out: list[Seg] = []
    last: str | None = None
    for seg in segments:
        if seg.name == "OBX":
            key = Seg("OBX", {**seg.fields, 1: literal("1")}, seg.stand_in).er7(for_validation=True)
            if key == last:
                continue
            last = key
        else:
            last = None
        out.append(seg)
    return out


@lru_cache(maxsize=16)
def _relaxed(structure: str) -> Any:
    """The message reference with each choice's alternatives optional: hl7apy's validator
    checks a ``choice`` like a ``sequence``, so ORM_O01's (OBR | RQD | RQ1 | RXO | ODS |
    ODT) would demand all six. The STRICT parse has already placed every segment."""

    def relax(ref: Any) -> Any:
        kind = ref[0]
        children = []
        for name, sub, (low, high), node, *rest in ref[1]:
            if node == "GRP":
                sub = relax(sub)
            children.append((name, sub, (0 if kind == "choice" else low, high), node, *rest))
        return (kind, tuple(children), *ref[2:])

    return relax(load_reference(structure, "Message", VERSION))


def _reason(exc: Exception, segments: list[Seg]) -> str:
    """hl7apy's complaint, reduced to element names (its texts may quote values)."""
    kind = type(exc).__name__
    message = str(exc)
    if kind == "ValidationError":
        # hl7apy's ValidationError texts name elements only; still, only names are kept.
        what = next((w for start, w in _COMPLAINTS if message.startswith(start)), "not allowed")
        found = _NAME.search(message)
        if found:
            return f"{found.group(1)}-{int(found.group(2))}: {what} (hl7apy {kind})"
        segment = _SEGMENT.search(message)
        if segment:
            return f"{segment.group(1)}: {what} (hl7apy {kind})"
        return f"message structure: {what} (hl7apy {kind})"
    where = _locate(segments)
    return f"{where}: rejected by hl7apy ({kind})" if where else f"rejected by hl7apy ({kind})"


def _locate(segments: list[Seg]) -> str | None:
    """The first field hl7apy refuses on its own (only on the failure path)."""
    for seg in segments:
        values = {**seg.fields, **seg.stand_in}
        for n in sorted(values):
            if seg.name == "MSH" and n < 3:
                continue
            try:
                parse_field(
                    values[n], name=f"{seg.name}_{n}", version=VERSION, validation_level=_STRICT
                )
            except Exception:
                return f"{seg.name}-{n}"
    return None
