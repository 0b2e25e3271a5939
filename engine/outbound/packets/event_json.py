"""``json.event``: the referral event as JSON, for webhooks (a partner's own integration).

Minimum necessary: identifiers, states and timestamps of the referral and the event,
the event's appointment/note references — not the patient's demographics. A partner
who needs the clinical packet gets a FHIR bundle or the PDF instead.
"""

from __future__ import annotations

import json
from typing import Any

from engine.domain.referral import BSER
from engine.outbound.model import PacketContext, Rendered

#: Event fields safe to pass on: references and codes, never names or free text.
_SAFE_FIELDS = (
    "correlate.placer_order",
    "correlate.filler_order",
    "correlate.referral_id",
    "appointment_id",
    "start",
    "end",
    "status",
    "document_id",
    "report_status",
    "specialty",
    "priority",
)


def render_event(ctx: PacketContext) -> Rendered:
    task_status, business = BSER[ctx.referral.state]
    fields: dict[str, Any] = {k: ctx.event.fields[k] for k in _SAFE_FIELDS if k in ctx.event.fields}
    body = {
        "delivery": {"id": ctx.delivery_id, "idempotency_key": ctx.idempotency_key},
        "event": {
            "id": ctx.event.id,
            "type": ctx.event.type.value,
            "occurred_at": ctx.event.occurred_at.isoformat(),
            "sequence": ctx.event.sequence,
            "state_before": ctx.event.state_before.value if ctx.event.state_before else None,
            "state_after": ctx.event.state_after.value if ctx.event.state_after else None,
            "fields": fields,
        },
        "referral": {
            "id": ctx.referral.id,
            "state": ctx.referral.state.value,
            "task_status": task_status,
            "business_status": business,
            "created_at": ctx.referral.created_at.isoformat(),
            "updated_at": ctx.referral.updated_at.isoformat(),
        },
    }
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return Rendered(payload, "application/json", {"subject": f"Referral {ctx.event.type.value}"})


RENDERERS = {"json.event": render_event}
