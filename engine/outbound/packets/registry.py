"""Every packet format by name: what a route's or a directory target's ``format`` names."""

from __future__ import annotations

from collections.abc import Mapping

from engine.outbound.packets import Renderer


def renderers() -> Mapping[str, Renderer]:
    """Imported on first use: hl7apy and fhir.resources take a moment to load, and only
    the processes that render (the daemon's dispatcher, the CLI) need them."""
    from engine.outbound.packets import document, event_json, fhir, hl7v2

    out: dict[str, Renderer] = {}
    for module in (hl7v2, fhir, document, event_json):
        out.update(module.RENDERERS)
    return out


#: The names, without importing the renderers (config and mapping checks).
FORMATS = frozenset(
    {
        "hl7v2.ref_i12",
        "hl7v2.omg_o19",
        "hl7v2.orm_status",
        "hl7v2.oru_note",
        "hl7v2.mdm_note",
        "fhir.referral_bundle",
        "fhir.status_update",
        "document.pdf",
        "document.html",
        "json.event",
    }
)
