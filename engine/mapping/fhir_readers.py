"""Typed readers (``as:``) for FHIR R4 JSON values → canonical values (pure).

The FHIR twin of :mod:`engine.mapping.readers`: same readers, same canonical shapes
(``engine/domain/events.py``), chosen by the FHIR type the compiled path selects:

* ``identifier``: an Identifier → ``{value, namespace: system, type: type.coding[0].code}``;
  a Reference → ``{value: id, namespace: Type}`` for ``Type/id`` (relative or absolute,
  history dropped), else its logical ``identifier``; the resource's own ``id`` →
  ``{value: id, namespace: resourceType}`` (so a ServiceRequest and a reference to it
  give the same key); any other primitive → ``{value}``.
  A system ``urn:oid:X`` becomes namespace ``X`` and refloop's own
  ``urn:refloop:assigner:X`` becomes ``X``, which is how HL7 v2 carries the assigning
  authority (EI.2/EI.3, CX.4): a feed that sends the same order over both meets itself.
* ``coding``: a CodeableConcept → its first coding ``{code, display, system}`` (display
  from the coding, else the concept's text; only the text when no coding) — select
  another coding in the path, ``code.coding.where(system = '…').first()``; a Coding →
  ``{code, display, system}``; a code → ``{code}``.
* ``person_name``: a HumanName → ``{family, given: given[0], middle: the other given
  names}``.
* ``datetime`` / ``date``: ``date``, ``dateTime``, ``instant`` (and partial dates,
  ``2024`` and ``2024-05``, read as their first day). A value without a UTC offset
  (a date, or a time sent without one, which FHIR forbids) takes the mapping's zone and
  says so (``timezone_assumed``), as on the HL7 side.
* ``string`` / ``int`` / ``decimal``: primitives as text (booleans ``true``/``false``).

A reader returns None for "no value" and raises :class:`BadValue` with a reason that
never quotes the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

from engine.mapping.fhirpath import FhirPath, parse_reference
from engine.mapping.plan import Reader
from engine.mapping.readers import Assumed, BadValue

_SYSTEM_PREFIXES = ("urn:oid:", "urn:refloop:assigner:")

# FHIR R4 date / dateTime / instant (datatypes.html), with seconds optional: a missing
# seconds part is a sender's slip, not a reason to lose the time.
_DATETIME = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<mo>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<frac>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def read_fhir(
    reader: Reader,
    value: Any,
    path: FhirPath,
    resource_type: str,
    zone: tzinfo,
    assumed: Assumed,
) -> Any:
    if reader is Reader.STRING:
        return _text(value)
    if reader is Reader.IDENTIFIER:
        return _identifier(value, path, resource_type)
    if reader is Reader.CODING:
        return _coding(value, path)
    if reader is Reader.PERSON_NAME:
        return _name(value)
    if reader is Reader.INT:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
            return int(value)
        raise BadValue("not a whole number")
    if reader is Reader.DECIMAL:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise BadValue("not a decimal number")
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            raise BadValue("not a decimal number") from None
        if not number.is_finite():
            raise BadValue("not a decimal number")
        return str(number)
    if not isinstance(value, str):
        raise BadValue("not a FHIR date or dateTime")
    moment, has_offset = parse_datetime(value)
    if reader is Reader.DATE:
        return moment.date().isoformat()
    if not has_offset:
        moment = moment.replace(tzinfo=zone)
        assumed.zone = True
    return moment.isoformat()


def parse_datetime(text: str) -> tuple[datetime, bool]:
    """A FHIR date, dateTime or instant: (the moment, naive when no offset was sent;
    whether an offset was sent). Raises :class:`BadValue`."""
    m = _DATETIME.match(text.strip())
    if m is None:
        raise BadValue("not a FHIR date or dateTime (YYYY-MM-DDThh:mm:ss+zz:zz)")
    g = m.groupdict()
    try:
        naive = datetime(
            int(g["y"]),
            int(g["mo"] or 1),
            int(g["d"] or 1),
            int(g["h"] or 0),
            int(g["mi"] or 0),
            int(g["s"] or 0),
            int((g["frac"] or "0").ljust(6, "0")[:6]),
        )
    except ValueError as exc:
        raise BadValue(f"impossible date or time ({exc})") from None
    tz = g["tz"]
    if not tz:
        return naive, False
    if tz == "Z":
        return naive.replace(tzinfo=UTC), True
    hours, minutes = int(tz[1:3]), int(tz[4:6])
    if hours > 14 or minutes > 59:
        raise BadValue("time zone offset out of range")
    sign = 1 if tz[0] == "+" else -1
    return naive.replace(tzinfo=timezone(sign * timedelta(hours=hours, minutes=minutes))), True


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise BadValue("not a primitive value")  # the compiler refuses such paths


def namespace(system: str) -> str:
    for prefix in _SYSTEM_PREFIXES:
        if system.startswith(prefix) and len(system) > len(prefix):
            return system[len(prefix) :]
    return system


def identifier(value: Mapping[str, Any]) -> dict[str, str] | None:
    """An Identifier as ``{value, namespace?, type?}``."""
    text = value.get("value")
    if not isinstance(text, str) or not text.strip():
        return None
    out = {"value": text.strip()}
    system = value.get("system")
    if isinstance(system, str) and system.strip():
        out["namespace"] = namespace(system.strip())
    code = _first_code(value.get("type"))
    if code:
        out["type"] = code
    return out


def _first_code(concept: Any) -> str:
    if not isinstance(concept, Mapping):
        return ""
    codings = concept.get("coding")
    if isinstance(codings, list) and codings and isinstance(codings[0], Mapping):
        code = codings[0].get("code")
        if isinstance(code, str):
            return code.strip()
    return ""


def _identifier(value: Any, path: FhirPath, resource_type: str) -> dict[str, str] | None:
    if path.type == "Identifier":
        return identifier(_object(value))
    if path.type == "Reference":
        ref = _object(value)
        text = ref.get("reference")
        if isinstance(text, str):
            parsed = parse_reference(text.strip())
            if parsed is not None:
                return {"value": parsed[1], "namespace": parsed[0]}
        logical = ref.get("identifier")
        return identifier(logical) if isinstance(logical, Mapping) else None
    text = _text(value)
    if text is None or not text.strip():
        return None
    if path.resource_id:
        return {"value": text.strip(), "namespace": resource_type}
    return {"value": text.strip()}


def _coding(value: Any, path: FhirPath) -> dict[str, str] | None:
    if path.type == "CodeableConcept":
        concept = _object(value)
        codings = concept.get("coding")
        first = codings[0] if isinstance(codings, list) and codings else None
        out = _one_coding(first) if isinstance(first, Mapping) else {}
        text = concept.get("text")
        if "display" not in out and isinstance(text, str) and text.strip():
            out["display"] = text.strip()
        return out or None
    if path.type == "Coding":
        return _one_coding(_object(value)) or None
    text = _text(value)
    return {"code": text.strip()} if text and text.strip() else None


def _one_coding(coding: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("code", "display", "system"):
        text = coding.get(key)
        if isinstance(text, str) and text.strip():
            out[key] = text.strip()
    return out


def _name(value: Any) -> dict[str, str] | None:
    name = _object(value)
    out = {}
    family = name.get("family")
    if isinstance(family, str) and family.strip():
        out["family"] = family.strip()
    names = name.get("given")
    names = names if isinstance(names, list) else []
    given = [g.strip() for g in names if isinstance(g, str) and g.strip()]
    if given:
        out["given"] = given[0]
    if len(given) > 1:
        out["middle"] = " ".join(given[1:])
    return out or None


def _object(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BadValue("not a FHIR element (a JSON object was expected)")
    return value
