"""The JSON Schema of ``referral-policy/v1`` for editor completion, from the vocabulary the
loader enforces. The loader stays the authority (it also checks step order, ambiguous
rules and route names, and says file:line:column); the committed copy lives in
``mappings/_schema/`` and a test keeps it equal to what this module generates."""

from __future__ import annotations

import json
from typing import Any

from engine.mapping.schema import closed, one_or_many
from engine.policy import language as lang

NAME = "referral-policy.v1.json"

_TEXT = {"type": "string"}
_CODE = {"type": "string", "pattern": lang.CODE.pattern}
_DURATION = {
    "type": "string",
    "pattern": r"^(?=.)(\d+d)?(\d+h)?$",
    "description": "calendar time: 14d, 72h or 1d12h",
}
_LEVEL = {
    "anyOf": [
        {"type": "integer", "minimum": 1, "maximum": lang.MAX_LEVEL},
        {"type": "string", "pattern": f"^[1-{lang.MAX_LEVEL}]$"},
    ]
}


def _scope() -> dict[str, Any]:
    return {
        "states": one_or_many({"enum": list(lang.STATES)}),
        "specialty": one_or_many(_TEXT),
        "priority": one_or_many(_TEXT),
        "restart_on": one_or_many({"enum": list(lang.EVENTS)}),
    }


def _step(action: str, offset: str = "after") -> dict[str, Any]:
    values: dict[str, dict[str, Any]] = {
        "template": _CODE,
        "prefer": one_or_many({"enum": list(lang.OUTREACH_CHANNELS)}),
        "reason": _CODE,
        "owner": _CODE,
        "due": _DURATION,
        "level": _LEVEL,
        "to": {"enum": list(lang.NOTIFY_TO)},
        "route": _CODE,
    }
    needed, optional = lang.ACTION_KEYS[action]
    return closed(
        {
            offset: _DURATION,
            "do": {"const": action},
            **{k: values[k] for k in (*needed, *optional)},
        },
        (offset, "do", *needed),
    )


def policy_schema() -> dict[str, Any]:
    window = closed(
        {
            "id": _CODE,
            "description": _TEXT,
            **_scope(),
            "within": _DURATION,
            "reason": _CODE,
            "level": _LEVEL,
            "owner": _CODE,
            "due": _DURATION,
        },
        ("id", "states", "within"),
    )
    ladder = closed(
        {
            "id": _CODE,
            "description": _TEXT,
            "ladder": _CODE,
            **_scope(),
            "steps": {
                "type": "array",
                "minItems": 1,
                "items": {"oneOf": [_step(a) for a in lang.ACTIONS]},
            },
            "before_appointment": {
                "type": "array",
                "minItems": 1,
                "description": "steps counted back from the appointment start (while scheduled)",
                "items": {"oneOf": [_step(a, "before") for a in lang.ACTIONS]},
            },
        },
        ("id", "states"),
    )
    # One list or the other: after the state entry, or before the appointment.
    ladder["oneOf"] = [{"required": ["steps"]}, {"required": ["before_appointment"]}]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://refloop.dev/schema/{NAME}",
        "title": f"refloop referral policy ({lang.POLICY_SCHEMA})",
        **closed(
            {
                "schema": {"const": lang.POLICY_SCHEMA},
                "description": _TEXT,
                "windows": {"type": "array", "items": window},
                "ladders": {"type": "array", "items": ladder},
            },
            ("schema",),
        ),
    }


SCHEMAS = {NAME: policy_schema}


def render(name: str) -> str:
    return json.dumps(SCHEMAS[name](), indent=2, sort_keys=True) + "\n"
