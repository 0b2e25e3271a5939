"""JSON Schemas for editor completion of the outbound files, from the vocabulary the
loader enforces (the loader stays the authority: it also knows formats, channels and
directory ids, and says file:line:column). Committed copies live in ``mappings/_schema/``;
a test keeps them equal to what this module generates."""

from __future__ import annotations

import json
from typing import Any

from engine.mapping.schema import closed, one_or_many
from engine.outbound import directory as d
from engine.outbound import routing as r

_TEXT = {"type": "string"}
_BOOL = {"enum": ["true", "false", True, False]}  # the loader reads every scalar as text
_EVENT = {"enum": list(r.EVENTS)}


def _document(name: str, title: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://refloop.dev/schema/{name}",
        "title": title,
        **body,
    }


_PARTY = closed({k: _TEXT for k in d.PARTY_KEYS})


def routes_schema() -> dict[str, Any]:
    states = {"enum": list(r.STATES)}
    when = closed(
        {
            "state": one_or_many(states),
            "state_before": one_or_many({"enum": [r.NEW, *r.STATES]}),
            **{k: one_or_many(_TEXT) for k in ("specialty", "priority", "source", "recipient")},
        }
    )
    route = closed(
        {
            "id": _TEXT,
            "description": _TEXT,
            "on": one_or_many(_EVENT),
            "when": when,
            "send": {"enum": list(r.SENDS)},
            "to": {"enum": list(r.TOS)},
            "targets": {"enum": list(r.TARGET_CHOICES)},
            "format": _TEXT,
            "channel": _TEXT,
            "endpoint": _TEXT,
            "options": closed({k: _TEXT for k in r.ROUTE_OPTIONS}),
            "enabled": _BOOL,
        },
        ("id", "on", "send"),
    )
    return _document(
        "referral-routes.v1.json",
        f"refloop outbound routes ({r.ROUTES_SCHEMA})",
        closed(
            {"schema": {"const": r.ROUTES_SCHEMA}, "routes": {"type": "array", "items": route}},
            ("schema",),
        ),
    )


def writeback_schema() -> dict[str, Any]:
    entry = closed(
        {
            "description": _TEXT,
            "enabled": _BOOL,
            "channel": _TEXT,
            "endpoint": _TEXT,
            "status_format": _TEXT,
            "note_format": _TEXT,
            "receiver": _PARTY,
            "events": one_or_many(_EVENT),
        },
        ("channel", "status_format"),
    )
    return _document(
        "referral-writeback.v1.json",
        f"refloop write-back to sources ({r.WRITEBACK_SCHEMA})",
        closed(
            {
                "schema": {"const": r.WRITEBACK_SCHEMA},
                "sources": {"type": "object", "additionalProperties": entry},
            },
            ("schema",),
        ),
    )


def directory_schema() -> dict[str, Any]:
    target = closed({k: _TEXT for k in d.TARGET_KEYS}, ("channel", "format"))
    specialist = closed(
        {
            "id": {"type": "string", "pattern": d.ID.pattern},
            "name": _TEXT,
            "npi": {"type": ["string", "integer"], "pattern": "^[0-9]{10}$"},
            **{
                k: one_or_many(_TEXT)
                for k in ("provider_names", "specialties", "accepted_plans", "locations")
            },
            "targets": {"type": "array", "items": target, "minItems": 1},
            "receiver": _PARTY,
            "active": _BOOL,
        },
        ("id", "name", "targets"),
    )
    return _document(
        "referral-directory.v1.json",
        f"refloop specialist directory ({d.DIRECTORY_SCHEMA})",
        closed(
            {
                "schema": {"const": d.DIRECTORY_SCHEMA},
                "specialists": {"type": "array", "items": specialist},
            },
            ("schema",),
        ),
    )


SCHEMAS = {
    "referral-routes.v1.json": routes_schema,
    "referral-writeback.v1.json": writeback_schema,
    "referral-directory.v1.json": directory_schema,
}


def render(name: str) -> str:
    return json.dumps(SCHEMAS[name](), indent=2, sort_keys=True) + "\n"
