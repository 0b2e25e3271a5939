"""Referral packets to a specialist: ``REF^I12`` and ``OMG^O19`` (360X style), v2.5.1.

Both carry the referral from canonical fields, plus what only the order message holds
(``ctx.sources["order"]``): its diagnoses (DG1), coverage (IN1) and clinical
observations (OBX), copied field by field and trimmed to v2.5.1.

REF^I12 (STANDARDS §2.5)::

    MSH RF1 PRD(RP) [PRD(RT)] PID [IN1…] [DG1…] [OBR [NTE…] [OBX…]] [NTE…]

* RF1-1 ``P`` (pending: the recipient has not decided), RF1-2 priority (table 0280),
  RF1-3 type (0281), RF1-4 disposition (0282), RF1-5 category (0284), RF1-6 the
  originating referral identifier — the placer order number as EI, else the referral
  number —, RF1-7 effective date = when the referral was created, RF1-10 the reason
  (``reason_code``, else the ``reason`` text as CE text). v2.5.1's RF1 ends at RF1-11:
  there is no RF1-14 reason text, so the text also goes in an NTE.
* The note and reason NTEs go under the OBR (notes about the order) when there is one,
  else at the end of the message.
* IN1-2 (plan) and IN1-3 (insurance company id, CX) are required in v2.5.1: the order
  message's IN1s are copied, else one IN1 is built from the canonical payer id (with its
  assigner) and plan; without either the coverage travels as an NTE line rather than
  being dropped (:func:`~engine.outbound.packets.hl7v2_order.insurance`).

OMG^O19 (STANDARDS §3, the 360X referral request)::

    MSH PID [IN1…] ORC [TQ1] OBR [NTE…] [DG1…] [OBX…]

``options["profile"] == "360X"``: MSH-21 ``360X`` and MSH-15/16 ``NE`` (360X travels over
Direct, without HL7 ACKs), and OBR-4 defaults to LOINC 57133-1 (Referral note).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.outbound.model import PacketContext, Rendered, RenderError
from engine.outbound.packets.hl7v2_common import (
    VALUE_TYPES,
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
    table_ce,
    text,
    ts,
    xcn,
    xpn,
)
from engine.outbound.packets.hl7v2_order import diagnoses, insurance, order_service

#: Canonical priority → table 0280 (RF1-2) / 0485 (TQ1-9). FHIR's ``urgent`` has no
#: code of its own in either table; ASAP is the nearest.
PRIORITY = {
    "stat": ("S", "STAT"),
    "asap": ("A", "ASAP"),
    "urgent": ("A", "ASAP"),
    "routine": ("R", "Routine"),
}
_TYPE = {
    code.lower(): (code, display)
    for code, display in (
        ("Lab", "Laboratory"),
        ("Rad", "Radiology"),
        ("Med", "Medical"),
        ("Psy", "Psychiatric"),
        ("Hom", "Home Care"),
        ("Skn", "Skilled Nursing"),
    )
}
_CATEGORY = {
    **{k: ("I", "Inpatient") for k in ("i", "inpatient")},
    **{k: ("O", "Outpatient") for k in ("o", "outpatient")},
    **{k: ("A", "Ambulatory") for k in ("a", "ambulatory")},
    **{k: ("E", "Emergency") for k in ("e", "emergency")},
}
_DISPOSITION = {
    "wr": ("WR", "Send Written Report"),
    "rp": ("RP", "Return Patient After Evaluation"),
    "am": ("AM", "Assume Management"),
    "so": ("SO", "Second Opinion"),
}
_REFERRAL_NOTE = literal("57133-1^Referral note^LN")


def ref_i12(ctx: PacketContext) -> Rendered:
    data = Data(ctx)
    order = Source.load(ctx, "order")
    body: list[Seg] = [_rf1(ctx, data), _prd_requester(data)]
    referred_to = _prd_recipient(ctx, data)
    if referred_to is not None:
        body.append(referred_to)
    body.append(pid(data))
    coverage, coverage_note = insurance(data, order)
    body.extend(coverage)
    body.extend(diagnoses(data, order))
    notes = [t for t in (data.text("reason"), data.text("note"), coverage_note) if t]
    service = _service(data, order)
    if service is not None:
        body.append(_obr(data, service))
        body.extend(nte(i, t, source="P") for i, t in enumerate(notes, 1))
        if order is not None:
            body.extend(copy_obx(order, types=VALUE_TYPES, default_code=service))
    else:
        body.extend(nte(i, t, source="P") for i, t in enumerate(notes, 1))
    return finish(ctx, msh(ctx, "REF^I12^REF_I12"), body)


def omg_o19(ctx: PacketContext) -> Rendered:
    data = Data(ctx)
    order = Source.load(ctx, "order")
    is_360x = ctx.options.get("profile", "").upper() == "360X"
    header = msh(ctx, "OMG^O19^OMG_O19", ack=("NE", "NE") if is_360x else ("AL", "NE"))
    if is_360x:
        header.set(21, literal("360X"))
    number = placer(data) or data.ident("correlate.referral_id", anywhere=True)
    if number is None:
        raise RenderError("ORC-2: the referral has no placer order number or referral number")
    service = _service(data, order) or (_REFERRAL_NOTE if is_360x else None)
    if service is None:
        raise RenderError("OBR-4: the referral has no service (service)")
    requester = xcn(data.ident("requester.identifier"), data.name("requester.name"))
    body: list[Seg] = [pid(data)]
    coverage, coverage_note = insurance(data, order)
    body.extend(coverage)
    body.append(
        Seg("ORC")
        .set(1, literal("NW"))
        .set(2, ei(number))
        .set(3, ei(filler(data)))
        .set(9, ts(data.when("requested_at") or ctx.referral.created_at))
        .set(12, requester)
        .set(21, text(data.text("requester.organization")))
    )
    priority = PRIORITY.get(data.text("priority") or "")
    due_by = data.when("due_by")
    if due_by is not None or priority is not None:
        body.append(
            Seg("TQ1")
            .set(1, literal("1"))
            .set(8, ts(due_by))
            .set(9, table_ce(*priority, "HL70485") if priority else None)
        )
    body.append(
        Seg("OBR")
        .set(1, literal("1"))
        .set(2, ei(number))
        .set(3, ei(filler(data)))
        .set(4, service)
        .set(16, requester)
        .set(31, _reason(data))
    )
    notes = [t for t in (data.text("reason"), data.text("note"), coverage_note) if t]
    body.extend(nte(i, t, source="P") for i, t in enumerate(notes, 1))
    body.extend(diagnoses(data, order))
    if order is not None:
        body.extend(copy_obx(order, types=VALUE_TYPES, default_code=service))
    return finish(ctx, header, body)


# -- segments -------------------------------------------------------------------------------------


def _rf1(ctx: PacketContext, data: Data) -> Seg:
    number = placer(data) or data.ident("correlate.referral_id", anywhere=True)
    if number is None:
        raise RenderError(
            "RF1-6: the referral has no placer order number or referral number"
            " (correlate.placer_order, correlate.referral_id)"
        )
    priority = PRIORITY.get(data.text("priority") or "")
    kind = data.text("referral_type")
    known_kind = _TYPE.get((kind or "").lower())
    category = _CATEGORY.get((data.text("category") or "").lower())
    disposition = _DISPOSITION.get((data.text("disposition") or "").lower())
    return (
        Seg("RF1")
        .set(1, table_ce("P", "Pending", "HL70283"))
        .set(2, table_ce(*priority, "HL70280") if priority else None)
        .set(3, table_ce(*known_kind, "HL70281") if known_kind else text(kind))
        .set(4, table_ce(*disposition, "HL70282") if disposition else None)
        .set(5, table_ce(*category, "HL70284") if category else None)
        .set(6, ei(number))
        .set(7, ts(ctx.referral.created_at))
        .set(10, _reason(data))
    )


def _reason(data: Data) -> Er7 | None:
    """RF1-10 / OBR-31 (CE): the coded reason, else the reason text as CE text."""
    return ce(data.coding("reason_code")) or comps(None, text(data.text("reason")))


def _prd_requester(data: Data) -> Seg:
    return (
        Seg("PRD")
        .set(1, table_ce("RP", "Referring Provider", "HL70286"))
        .set(2, xpn(data.name("requester.name")))
        .set(7, _pi(data.ident("requester.identifier")))
    )


def _prd_recipient(ctx: PacketContext, data: Data) -> Seg | None:
    """PRD(RT) from the directory entry the packet goes to, else from the order's
    ``recipient.*``; absent when neither names anyone."""
    prd = Seg("PRD").set(1, table_ce("RT", "Referred to Provider", "HL70286"))
    specialist = ctx.recipient
    if specialist is not None:
        if specialist.provider_names:
            family, _, given = specialist.provider_names[0].partition(",")
            prd.set(2, comps(text(family.strip()), text(given.strip())))
        else:
            # A practice, not a person: its name as a display name (table 0200 D).
            prd.set(2, comps(text(specialist.name), *([None] * 5), literal("D")))
        prd.set(7, comps(text(specialist.npi), literal("NPI")) if specialist.npi else None)
        return prd
    name = data.name("recipient.name")
    ident = data.ident("recipient.identifier")
    if name is None and ident is None:
        return None
    return prd.set(2, xpn(name)).set(7, _pi(ident))


def _pi(ident: Mapping[str, Any] | None) -> Er7 | None:
    """PRD-7 (PI in v2.5.1): id ^ type of id (the identifier's type, else its assigner)."""
    if not ident:
        return None
    kind = str(ident.get("type") or ident.get("namespace") or "")
    return comps(text(str(ident["value"])), text(kind))


def _service(data: Data, order: Source | None) -> Er7 | None:
    """The requested service: canonical, else the order message's OBR-4."""
    return ce(data.coding("service")) or order_service(order)


def _obr(data: Data, service: Er7) -> Seg:
    return (
        Seg("OBR")
        .set(1, literal("1"))
        .set(2, ei(placer(data)))
        .set(3, ei(filler(data)))
        .set(4, service)
        .set(16, xcn(data.ident("requester.identifier"), data.name("requester.name")))
        .set(31, _reason(data))
    )
