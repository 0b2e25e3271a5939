"""JSON Schemas for editor completion, generated from the vocabulary the compiler enforces.

The schemas are a convenience for editors (``# yaml-language-server: $schema=...``);
the compiler stays the authority, with file:line:column errors the schema cannot give.
``refloop mappings schema`` writes them to ``mappings/_schema/``; a test keeps the
committed copies equal to what this module generates.
"""

from __future__ import annotations

import json
from typing import Any

from engine.domain.events import CATALOGUE
from engine.domain.referral import Event
from engine.mapping import compiler as c
from engine.mapping import fixtures as f
from engine.mapping.plan import Input, OnNoMatch, OnUnmapped, Reader

_TEXT = {"type": "string"}
_BOOL = {"enum": ["true", "false", True, False]}  # the loader reads every scalar as text


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object with exactly these keys (the analysts' languages refuse unknown keys)."""
    out: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        out["required"] = list(required)
    return out


def one_or_many(item: dict[str, Any]) -> dict[str, Any]:
    """A value, or a non-empty list of them (``on: referral.created`` or a list)."""
    return {"anyOf": [item, {"type": "array", "items": item, "minItems": 1}]}


def mapping_schema() -> dict[str, Any]:
    fields = sorted({name for spec in CATALOGUE.values() for name in spec.fields})
    value = {
        "anyOf": [
            {
                "type": "string",
                "description": "a path: PID-3[.5=MR].1 (HL7 v2), or for input: fhir the "
                "FHIRPath subset, e.g. identifier.where(type.coding.code = 'PLAC').first()",
            },
            closed(
                {
                    "path": _TEXT,
                    "const": _TEXT,
                    "first_of": {"type": "array", "items": {"$ref": "#/$defs/alternative"}},
                    "concat": {"type": "array", "items": {"$ref": "#/$defs/value"}},
                    "join": _TEXT,
                    "count": _TEXT,
                    "as": {"enum": [r.value for r in Reader]},
                    "map": _TEXT,
                    "on_unmapped": {"enum": [o.value for o in OnUnmapped]},
                    "transform": {"type": "array", "items": {"$ref": "#/$defs/transform"}},
                    "default": _TEXT,
                    "required": _BOOL,
                    "on_null": {"enum": ["clear", "ignore"]},
                    "sep": _TEXT,
                }
            ),
        ]
    }
    condition = closed(
        {
            **{k: _TEXT for k in ("present", "absent", "is_null", "path", "count", "map")},
            "equals": _TEXT,
            "starts_with": _TEXT,
            "in_valueset": _TEXT,
            "in": {"type": "array", "items": _TEXT},
            **{k: {"type": ["string", "integer"]} for k in c.COUNT_OPS},
            "all": {"type": "array", "items": {"$ref": "#/$defs/condition"}},
            "any": {"type": "array", "items": {"$ref": "#/$defs/condition"}},
            "not": {"$ref": "#/$defs/condition"},
        }
    )
    field_map = {
        "type": "object",
        "propertyNames": {"enum": fields},
        "additionalProperties": {"$ref": "#/$defs/value"},
    }
    rule = closed(
        {
            "id": _TEXT,
            "emit": {"enum": [e.value for e in Event] + [c.IGNORE]},
            "foreach": {"anyOf": [_TEXT, {"type": "array", "items": _TEXT}]},
            "when": {"$ref": "#/$defs/condition"},
            "use": {"type": "array", "items": _TEXT},
            "fields": field_map,
            "reason": _TEXT,
        },
        ("id", "emit"),
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://refloop.dev/schema/referral-mapping.v1.json",
        "title": "refloop mapping (referral-mapping/v1)",
        **closed(
            {
                "schema": {"const": c.MAPPING_SCHEMA},
                "id": _TEXT,
                "title": _TEXT,
                "input": {"enum": [i.value for i in Input]},
                "match": {
                    **closed(
                        {
                            "message_type": {"anyOf": [_TEXT, {"type": "array", "items": _TEXT}]},
                            "resource": {"anyOf": [_TEXT, {"type": "array", "items": _TEXT}]},
                            "when": {"$ref": "#/$defs/condition"},
                        }
                    ),
                    "anyOf": [{"required": ["message_type"]}, {"required": ["resource"]}],
                },
                "defaults": closed(
                    {
                        "timezone": _TEXT,
                        "on_no_match": {"enum": [o.value for o in OnNoMatch]},
                        "rules": {"enum": ["all", "first"]},
                    },
                    ("timezone",),
                ),
                "segments": closed({"ignore": {"type": "array", "items": _TEXT}, "strict": _BOOL}),
                "elements": closed({"ignore": {"type": "array", "items": _TEXT}, "strict": _BOOL}),
                "field_sets": {"type": "object", "additionalProperties": field_map},
                "rules": {"type": "array", "items": rule, "minItems": 1},
            },
            ("schema", "id", "match", "defaults", "rules"),
        ),
        "$defs": {
            "value": value,
            "alternative": {
                "anyOf": [
                    {"$ref": "#/$defs/value"},
                    closed(
                        {"when": {"$ref": "#/$defs/condition"}, "value": {"$ref": "#/$defs/value"}},
                        ("when", "value"),
                    ),
                ]
            },
            "condition": condition,
            "transform": {
                "anyOf": [
                    {"enum": ["trim", "upper", "lower", "digits"]},
                    closed(
                        {
                            "truncate": {"type": ["string", "integer"]},
                            "replace": closed({"from": _TEXT, "to": _TEXT}, ("from",)),
                            "add_minutes": {"$ref": "#/$defs/value"},
                            "tz": _TEXT,
                        }
                    ),
                ]
            },
        },
    }


def valueset_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://refloop.dev/schema/referral-valueset.v1.json",
        "title": "refloop value set (referral-valueset/v1)",
        **closed(
            {
                "schema": {"const": c.VALUESET_SCHEMA},
                "id": _TEXT,
                "description": _TEXT,
                "target": _TEXT,
                "case_sensitive": _BOOL,
                "on_unmapped": {"enum": [o.value for o in OnUnmapped]},
                "map": {"type": "object", "additionalProperties": _TEXT},
            },
            ("schema", "id", "map"),
        ),
    }


def cases_schema() -> dict[str, Any]:
    diagnostic = {"anyOf": [_TEXT, closed({k: _TEXT for k in f.DIAGNOSTIC_KEYS}, ("code",))]}
    event = closed({"emit": _TEXT, "rule": _TEXT, "fields": {"type": "object"}}, ("emit",))
    case = closed(
        {
            "name": _TEXT,
            "message": _TEXT,
            "file": _TEXT,
            "index": {"type": ["string", "integer"]},
            "overlay": _TEXT,
            "resource": {"type": "string", "description": "a FHIR resource, as JSON text"},
            "expect": closed(
                {
                    "outcome": {"enum": ["processed", "ignored", "mapping_error"]},
                    "rule": _TEXT,
                    "events": {"type": "array", "items": event},
                    "diagnostics": {"type": "array", "items": diagnostic},
                    "error": diagnostic,
                }
            ),
        },
        ("name", "expect"),
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://refloop.dev/schema/referral-cases.v1.json",
        "title": "refloop mapping fixtures (*.cases.yaml)",
        **closed(
            {
                "mapping": _TEXT,
                "overlay": _TEXT,
                "context": closed({"received_at": _TEXT}),
                "cases": {"type": "array", "items": case},
            },
            ("cases",),
        ),
    }


def source_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://refloop.dev/schema/referral-source.v1.json",
        "title": "refloop source settings (sources/<name>/source.yaml)",
        **closed(
            {"schema": {"const": c.SOURCE_SCHEMA}, "description": _TEXT, "timezone": _TEXT},
            ("schema",),
        ),
    }


SCHEMAS = {
    "referral-mapping.v1.json": mapping_schema,
    "referral-valueset.v1.json": valueset_schema,
    "referral-cases.v1.json": cases_schema,
    "referral-source.v1.json": source_schema,
}


def render(name: str) -> str:
    return json.dumps(SCHEMAS[name](), indent=2, sort_keys=True) + "\n"
