"""Loop-closure write-back to the referring EHR: order status (ORM^O01) and the consult
note (ORU^R01 or MDM^T02), v2.5.1 (STANDARDS §8).

Every write-back names the EHR's own order — the placer order number with its assigner
(ORC-2 / OBR-2 / TXA-14) — or is not sent: without it the EHR cannot file it.

Order status (``hl7v2.orm_status``)
-----------------------------------
``ORC-1 = SC`` (status changed) with ``ORC-5`` from table 0038. ORC-5 follows the state
the referral is in *after* the trigger event, so a late or repeated message never walks
the EHR's order backwards (a booking that arrives after the visit still says IP); the
event only picks the NTE wording, and only when it is what moved the referral there.

=========================  ======================  =====  ==========================================
trigger event              state after             ORC-5  why
=========================  ======================  =====  ==========================================
referral.sent / delivered  sent                    IP     in process, unspecified
referral.accepted          accepted                IP     accepted, not yet booked (§6: ORC-5 IP)
authorization.pending      auth_pending            HD     on hold until the payer decides
appointment.booked         scheduled               SC     in process, scheduled (+ OBR-36 start)
appointment.rescheduled    scheduled               SC     same, the new start in OBR-36
appointment.cancelled      appointment_cancelled   IP     the *order* stands and awaits rebooking;
                                                          CA would tell the EHR it was cancelled
appointment.no_show        no_show                 IP     same: the slot is gone, SC would claim a
                                                          pending appointment; the NTE says why
appointment.completed      completed               IP     seen, but the result (the note) is not
                                                          back; CM is reserved for the outcome
consult_note.received      note_received           CM     order complete: the outcome is back
consult_note.amended       note_received           CM     still complete
referral.closed            closed                  CM     loop closed
referral.declined          declined                CA     the order will not be done (v2-to-FHIR:
                                                          revoked); ORC-16 carries the reason
referral.cancelled         cancelled               CA     cancelled
any other event            by state, as above      …      created: no status to report (RenderError)
=========================  ======================  =====  ==========================================

ORC-9 is the event's business time; ORC-3/OBR-3 the filler number when known; OBR-4 the
original service. The appointment start goes in **OBR-36** (scheduled date/time: "the
date/time the filler scheduled an observation"): ORM_O01 has no TQ1 in v2.5.1 and
ORC-7/OBR-27 (TQ) are kept for backward compatibility only. The one NTE is a fixed
phrase; the only text taken from an inbound message is the event's ``status_reason``.

Consult note (``hl7v2.oru_note`` / ``hl7v2.mdm_note``)
------------------------------------------------------
The note's content is the trigger message's OBX segments (TX/FT/ST/ED, re-emitted with
their value type): an ORU^R01, or an MDM (the OBX after TXA). Anything else →
``RenderError("no note content: the trigger message carries no OBX")``.

ORU^R01: ORC-1 RE, OBR-2/3 placer/filler, OBR-4 the document type (default
``11488-4^Consult note^LN``), OBR-7 observed, OBR-25 ``F`` (``C`` for an amended note).

MDM: TXA-2 ``CN`` (table 0270 consultation; the LOINC type stays in OBR-4 and OBX-3),
TXA-4 activity time, TXA-12 the document id, TXA-14/15 placer/filler, TXA-17 ``AU``,
TXA-19 ``AV``; PV1 is required in MDM_T02 and says ``O`` (a referral consult is
outpatient). ``consult_note.amended`` is sent as **MDM^T10** (replacement, TXA-13 =
the parent document) when the parent is known: v2 §9 allows T08 (edit) only while a
document is still unavailable, and ours was made available (AV) by the first
write-back. Without a parent id the amendment re-uses the document id and only T08
can say so.
"""

from __future__ import annotations

from datetime import datetime

from engine.domain.referral import Event, State
from engine.outbound.model import PacketContext, Rendered, RenderError
from engine.outbound.packets.hl7v2_common import (
    NOTE_TYPES,
    Data,
    Er7,
    Seg,
    Source,
    ce,
    comps,
    copy_obx,
    ei,
    filler,
    finish,
    literal,
    msh,
    nte,
    pid,
    placer,
    text,
    ts,
    xcn,
)
from engine.outbound.packets.hl7v2_order import order_service

E = Event
S = State

#: State after the event → ORC-5 (table 0038), see the crosswalk above.
ORDER_STATUS: dict[State, str] = {
    S.AUTH_PENDING: "HD",
    S.SENT: "IP",
    S.ACCEPTED: "IP",
    S.SCHEDULED: "SC",
    S.APPOINTMENT_CANCELLED: "IP",
    S.NO_SHOW: "IP",
    S.COMPLETED: "IP",
    S.NOTE_RECEIVED: "CM",
    S.CLOSED: "CM",
    S.DECLINED: "CA",
    S.CANCELLED: "CA",
}

#: The NTE wording per state; an event's own wording applies when it moved the referral
#: to the state it names (EVENT_TEXT).
STATE_TEXT: dict[State, str] = {
    S.AUTH_PENDING: "Referral on hold: authorization pending",
    S.SENT: "Referral sent to the specialist",
    S.ACCEPTED: "Referral accepted by the specialist",
    S.SCHEDULED: "Appointment scheduled",
    S.APPOINTMENT_CANCELLED: "Appointment cancelled; the referral awaits rebooking",
    S.NO_SHOW: "Patient did not attend the appointment; the referral awaits rebooking",
    S.COMPLETED: "Visit completed; consult note pending",
    S.NOTE_RECEIVED: "Consult note received",
    S.CLOSED: "Referral closed",
    S.DECLINED: "Referral declined by the specialist",
    S.CANCELLED: "Referral cancelled",
}
EVENT_TEXT: dict[Event, tuple[State, str]] = {
    E.APPOINTMENT_RESCHEDULED: (S.SCHEDULED, "Appointment rescheduled"),
    E.CONSULT_NOTE_AMENDED: (S.NOTE_RECEIVED, "Consult note amended"),
    E.AUTHORIZATION_DENIED: (S.AUTH_PENDING, "Referral on hold: authorization denied"),
}

DOCUMENT_TYPE = literal("11488-4^Consult note^LN")
_PRESENTATION = frozenset({"AP", "AU", "FT", "IM", "NS", "SD", "SI", "TEXT", "TX"})  # 0191


def orm_status(ctx: PacketContext) -> Rendered:
    data = Data(ctx)
    number = placer(data)
    if number is None:
        raise RenderError("ORC-2: the referral has no placer order number (correlate.placer_order)")
    state = ctx.event.state_after or ctx.referral.state
    status = ORDER_STATUS.get(state)
    if status is None:
        raise RenderError(f"ORC-5: no order status to report for a referral that is {state}")
    service = ce(data.coding("service")) or order_service(Source.load(ctx, "order"))
    if service is None:
        raise RenderError("OBR-4: the referral has no service (service)")
    reason = ctx.event.fields.get("status_reason")
    reason = reason if isinstance(reason, str) and reason else None
    start = data.when("start", group="appointment") if status == "SC" else None
    wording = status_text(ctx.event.type, state)
    escalation = ctx.event.fields.get("escalation.reason")
    if ctx.event.type is E.REFERRAL_ESCALATED and isinstance(escalation, str) and escalation:
        # A policy notice to the referrer (escalation_to_referrer, no_show_notice): the
        # status stays the referral's; the NTE says why the practice hears about it now.
        wording = f"Referral needs attention ({escalation.replace('_', ' ')}). {wording}"
    if start is not None:
        wording += f" for {start:%Y-%m-%d %H:%M}" + (f" ({start:%z})" if start.tzinfo else "")
    if reason:
        wording += f". Reason: {reason}"
    body = [
        pid(data),
        Seg("ORC")
        .set(1, literal("SC"))
        .set(2, ei(number))
        .set(3, ei(filler(data)))
        .set(5, literal(status))
        .set(9, ts(ctx.event.occurred_at))
        .set(16, comps(None, text(reason)) if status == "CA" else None),
        Seg("OBR")
        .set(1, literal("1"))
        .set(2, ei(number))
        .set(3, ei(filler(data)))
        .set(4, service)
        .set(36, ts(start)),
        nte(1, wording, source="L"),
    ]
    return finish(ctx, msh(ctx, "ORM^O01^ORM_O01"), body)


def status_text(event: Event, state: State) -> str:
    own = EVENT_TEXT.get(event)
    if own is not None and own[0] == state:
        return own[1]
    return STATE_TEXT.get(state, f"Referral status: {state}")


def oru_note(ctx: PacketContext) -> Rendered:
    data = Data(ctx)
    number = placer(data)
    if number is None:
        raise RenderError("OBR-2: the referral has no placer order number (correlate.placer_order)")
    amended = ctx.event.type is E.CONSULT_NOTE_AMENDED
    status = "C" if amended else _report_status(data)
    doc_type = ce(data.coding("document_type", group="consult_note", event=True)) or DOCUMENT_TYPE
    content = _note_content(ctx, doc_type, "C" if amended else "F")
    body = [
        pid(data),
        Seg("ORC").set(1, literal("RE")).set(2, ei(number)).set(3, ei(filler(data))),
        Seg("OBR")
        .set(1, literal("1"))
        .set(2, ei(number))
        .set(3, ei(filler(data)))
        .set(4, doc_type)
        .set(7, ts(_observed(ctx, data)))
        .set(22, ts(ctx.event.occurred_at))
        .set(25, literal(status)),
        *content,
    ]
    return finish(ctx, msh(ctx, "ORU^R01^ORU_R01"), body)


def mdm_note(ctx: PacketContext) -> Rendered:
    data = Data(ctx)
    number = placer(data)
    if number is None:
        raise RenderError(
            "TXA-14: the referral has no placer order number (correlate.placer_order)"
        )
    note = {"group": "consult_note", "event": True}
    document = ei(data.ident("document_id", **note)) or _trigger_document(ctx)
    if document is None:
        raise RenderError("TXA-12: the consult note has no document id (document_id)")
    parent = ei(data.ident("parent_document_id", **note))
    amended = ctx.event.type is E.CONSULT_NOTE_AMENDED
    trigger = ("T10" if parent else "T08") if amended else "T02"
    coding = data.coding("document_type", **note)
    doc_type = ce(coding) or DOCUMENT_TYPE
    # TXA-2 is IS (table 0270) in v2.5.1, not CE: a LOINC type cannot go there.
    kind = str(coding.get("code") or "") if coding and coding.get("system") == "HL70270" else ""
    presentation = data.text("content_type", **note)
    content = _note_content(ctx, doc_type, "C" if amended else "F")
    observed = _observed(ctx, data)
    body = [
        Seg("EVN").set(1, literal(trigger)).set(2, ts(ctx.event.occurred_at)),
        pid(data),
        Seg("PV1").set(1, literal("1")).set(2, literal("O")),
        Seg("ORC").set(1, literal("RE")).set(2, ei(number)).set(3, ei(filler(data))),
        Seg("OBR")
        .set(1, literal("1"))
        .set(2, ei(number))
        .set(3, ei(filler(data)))
        .set(4, doc_type),
        Seg("TXA")
        .set(1, literal("1"))
        .set(2, text(kind) or literal("CN"))
        .set(3, literal(presentation) if presentation in _PRESENTATION else None)
        .set(4, ts(observed))
        .set(9, xcn(data.ident("author.identifier", **note), data.name("author.name", **note)))
        .set(12, document)
        .set(13, parent if amended else None)
        .set(14, ei(number))
        .set(15, ei(filler(data)))
        .set(17, literal("AU"))
        .set(19, literal("AV")),
        *content,
    ]
    return finish(ctx, msh(ctx, f"MDM^{trigger}^MDM_T02"), body)


# -- helpers ---------------------------------------------------------------------------------------


def _note_content(ctx: PacketContext, doc_type: Er7, status: str) -> list[Seg]:
    trigger = Source.load(ctx, "trigger")
    if trigger is None:
        raise RenderError("no note content: the delivery has no trigger message")
    content: list[Seg] = []
    if trigger.message_code in ("ORU", "MDM"):
        content = copy_obx(trigger, types=NOTE_TYPES, default_code=doc_type, default_status=status)
    if not content:
        raise RenderError("no note content: the trigger message carries no OBX")
    return content


def _trigger_document(ctx: PacketContext) -> Er7 | None:
    trigger = Source.load(ctx, "trigger")
    if trigger is None:
        return None
    for txa in trigger.all("TXA"):
        return trigger.field(txa, 12)
    return None


def _observed(ctx: PacketContext, data: Data) -> datetime:
    return data.when("observed_at", group="consult_note", event=True) or ctx.event.occurred_at


_REPORT_STATUS = {"final": "F", "corrected": "C", "amended": "C", "preliminary": "P"}


def _report_status(data: Data) -> str:
    status = data.text("report_status", group="consult_note", event=True) or ""
    return _REPORT_STATUS.get(status.lower(), "F")
