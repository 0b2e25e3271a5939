"""Typed readers (``as:``) and transforms: raw HL7 text → canonical values (pure).

A reader receives the still-escaped text a path selected and the path itself (whose
segment and field give the datatype from :mod:`engine.protocol.hl7types`), and returns
canonical data or raises :class:`BadValue` with a reason that never quotes the value.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

from engine.mapping.plan import Reader, Transform
from engine.protocol.hl7message import Message
from engine.protocol.hl7path import Path
from engine.protocol.hl7types import (
    IDENTIFIER_LAYOUT,
    NAME_LAYOUT,
    TimestampError,
    field_type,
    parse_ts,
)


class BadValue(ValueError):
    """The text is not a valid value for the reader; the message says why, not what."""


class Assumed:
    """Set when a datetime had no offset and the mapping's zone was applied."""

    def __init__(self) -> None:
        self.zone = False


def read_as(
    reader: Reader, raw: str, path: Path, message: Message, zone: tzinfo, assumed: Assumed
) -> Any:
    if reader is Reader.STRING:
        return message.unescape(raw)
    if reader is Reader.IDENTIFIER:
        return _identifier(raw, path, message)
    if reader is Reader.CODING:
        return _coding(raw, path, message)
    if reader is Reader.PERSON_NAME:
        return _name(raw, path, message)
    text = message.unescape(raw).strip()
    if reader is Reader.INT:
        try:
            return int(text)
        except ValueError:
            raise BadValue("not a whole number") from None
    if reader is Reader.DECIMAL:
        try:
            return str(Decimal(text))
        except InvalidOperation:
            raise BadValue("not a decimal number") from None
    # TS in v2.3-2.5 is a composite whose first component is the time.
    text = text.split(message.delims.component)[0]
    try:
        ts = parse_ts(text)
    except TimestampError as exc:
        raise BadValue(str(exc)) from None
    if reader is Reader.DATE:
        return ts.as_date().isoformat()
    value = ts.value
    if not ts.has_offset:
        value = value.replace(tzinfo=zone)
        assumed.zone = True
    return value.isoformat()


def _parts(raw: str, message: Message) -> list[list[str]]:
    d = message.delims
    return [comp.split(d.subcomponent) for comp in raw.split(d.component)]


def _pick(parts: list[list[str]], comp: int, sub: int | None, message: Message) -> str:
    if comp < 1 or comp > len(parts):
        return ""
    subs = parts[comp - 1]
    if sub is None:
        text = message.delims.subcomponent.join(subs)
    else:
        text = subs[sub - 1] if sub <= len(subs) else ""
    return "" if text == '""' else message.unescape(text).strip()


def _datatype(path: Path) -> str | None:
    if path.component is not None or path.field is None:
        return None  # a single component was selected: it is the value itself
    return field_type(path.segment, path.field)


def _identifier(raw: str, path: Path, message: Message) -> dict[str, str] | None:
    kind = _datatype(path)
    if path.component is not None:
        value = message.unescape(raw).strip()
        return {"value": value} if value else None
    layout = IDENTIFIER_LAYOUT.get(kind or "EI", IDENTIFIER_LAYOUT["EI"])
    parts = _parts(raw, message)
    value, namespace, universal, id_type = (_pick(parts, c, s, message) for c, s in layout)
    if not value:
        return None
    out = {"value": value}
    if namespace or universal:
        out["namespace"] = namespace or universal
    if id_type:
        out["type"] = id_type
    return out


def _coding(raw: str, path: Path, message: Message) -> dict[str, str] | None:
    if path.component is not None:
        code = message.unescape(raw).strip()
        return {"code": code} if code else None
    parts = _parts(raw, message)
    out = {}
    for key, comp in (("code", 1), ("display", 2), ("system", 3)):
        text = _pick(parts, comp, None, message)
        if text:
            out[key] = text
    return out or None


def _name(raw: str, path: Path, message: Message) -> dict[str, str] | None:
    if path.component is not None:
        family = message.unescape(raw).strip()
        return {"family": family} if family else None
    layout = NAME_LAYOUT.get(_datatype(path) or "XPN", NAME_LAYOUT["XPN"])
    parts = _parts(raw, message)
    out = {}
    for key, (comp, sub) in zip(("family", "given", "middle"), layout, strict=True):
        text = _pick(parts, comp, sub, message)
        if text:
            out[key] = text
    return out or None


def apply_transform(t: Transform, value: Any, minutes: int | None) -> Any:
    """One closed-list transform; raises :class:`BadValue` when it cannot apply."""
    if t.name in ("add_minutes", "tz"):
        if not isinstance(value, str):
            raise BadValue(f"{t.name} needs a datetime")
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise BadValue(f"{t.name} needs a datetime (as: datetime)") from None
        if t.name == "add_minutes":
            if minutes is None:
                return value  # no duration sent: the time stays as it was
            return (moment + timedelta(minutes=minutes)).isoformat()
        return moment.astimezone(t.zone or UTC).isoformat()
    if not isinstance(value, str):
        raise BadValue(f"{t.name} works on text")
    if t.name == "trim":
        return value.strip()
    if t.name == "upper":
        return value.upper()
    if t.name == "lower":
        return value.lower()
    if t.name == "digits":
        return "".join(ch for ch in value if ch.isdigit())
    if t.name == "truncate":
        return value[: t.number]
    if t.name == "replace":
        return value.replace(t.old, t.new)
    raise BadValue(f"unknown transform {t.name}")  # the compiler makes this unreachable
