"""hl7apy validation of a rendered message (v2.5.1, STRICT), reasons without values.

Theory of operation
-------------------
:func:`validate` serialises the segments (OBX-5 stubbed, see
:mod:`engine.outbound.packets.hl7v2_copy`), has hl7apy parse the text back at ``STRICT``
validation with group finding, then ``validate()`` it: the structure, required fields
and cardinalities, datatypes, lengths and DTM formats of v2.5.1, and the segment order.

Reasons in :class:`RenderError` name a field (``PID-3``), never a value; hl7apy's
exception texts are reduced to element names, and when an exception names none the
failing field is found by re-parsing each field on its own.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from hl7apy import load_reference
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_field, parse_message
from hl7apy.validation import Validator

from engine.outbound.model import RenderError
from engine.outbound.packets.hl7v2_er7 import VERSION, Seg, literal

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
