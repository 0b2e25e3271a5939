"""ER7 text for the HL7 v2 renderers (pure): escaping, the datatype encoders, segments.

Theory of operation
-------------------
A renderer builds a list of :class:`Seg` — a segment name and its fields by number —
where every field is already ER7 text (:data:`Er7`). The only ways to make ``Er7`` are
the encoders below (:func:`text`, :func:`ei`, :func:`cx`, :func:`ts` …), which escape every
value, and :class:`~engine.outbound.packets.hl7v2_copy.Source`, which copies fields out
of a stored message. So an unescaped value cannot reach a field by accident; mypy keeps
it so.

Why not set values through hl7apy's API: assigning a string parses it as ER7 (so ``^``
in a name splits it), escaping happens only for datatype objects, line breaks are never
escaped, and hl7apy re-escapes its own output (``\\.br\\`` becomes ``\\E\\.br\\E\\``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, NewType

from engine.protocol.hl7message import Delimiters

VERSION = "2.5.1"

#: ER7 text, escaped for the standard delimiters ``|^~\\&``.
Er7 = NewType("Er7", str)

D = Delimiters()  # ours: | ^ ~ \ &

# Not engine.protocol.hl7v2.escape: that one (for ACK text, any delimiters) turns line breaks
# into spaces; a packet keeps them (``\.br\`` in FT, hex escapes elsewhere) and hex-escapes
# control characters.
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
