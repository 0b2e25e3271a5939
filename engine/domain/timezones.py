"""The patient's time zone, as outreach planning and its messages both need it."""

from __future__ import annotations

from datetime import UTC, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def zone_of(name: str | None, default: str) -> tzinfo:
    """The zone ``name`` (an IANA name), else ``default``, else UTC: a bad name from a feed
    never stops a reminder, it only loses the patient's local time."""
    for candidate in (name, default):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return UTC
