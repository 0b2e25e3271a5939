"""Every packet format by name: what a route's or a directory target's ``format`` names."""

from __future__ import annotations

from collections.abc import Mapping

from engine.outbound.packets import Renderer


def renderers() -> Mapping[str, Renderer]:
    """Imported on first use: hl7apy and fhir.resources take a moment to load, and only
    the processes that render (the daemon's dispatcher, the CLI) need them."""
    import engine.outbound.packets.document as document
    import engine.outbound.packets.event_json as event_json
    import engine.outbound.packets.fhir as fhir
    import engine.outbound.packets.hl7v2 as hl7v2
    import engine.outbound.packets.outreach as outreach

    out: dict[str, Renderer] = {}
    for table in (
        hl7v2.RENDERERS,
        fhir.RENDERERS,
        document.RENDERERS,
        event_json.RENDERERS,
        outreach.RENDERERS,
    ):
        out.update(table)
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
        "outreach.sms",
        "outreach.email",
    }
)
