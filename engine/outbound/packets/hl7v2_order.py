"""What the HL7 v2 packets take from the order message beside the canonical fields (pure).

The referral's canonical fields say what the order meant; the order message
(``ctx.sources["order"]``) also holds what they leave out: the requested service as
the EHR coded it (OBR-4), every diagnosis (DG1) and the coverage (IN1). These are
copied field by field (:class:`~engine.outbound.packets.hl7v2_copy.Source`), trimmed to
v2.5.1, with the canonical values first or on top.
"""

from __future__ import annotations

from engine.outbound.packets.hl7v2_common import (
    Data,
    Er7,
    Seg,
    Source,
    ce,
    comps,
    cx,
    literal,
    text,
)


def order_service(order: Source | None) -> Er7 | None:
    """The order message's first OBR-4 (universal service identifier)."""
    if order is not None:
        for obr in order.all("OBR"):
            found = order.field(obr, 4)
            if found:
                return found
    return None


def diagnoses(data: Data, order: Source | None) -> list[Seg]:
    """DG1 per diagnosis: the canonical one first, then the order message's others."""
    out: list[Seg] = []
    seen: set[str] = set()
    coding = data.coding("diagnosis")
    if coding is not None:
        out.append(_dg1(1, ce(coding), literal("W")))
        seen.add(str(coding.get("code") or ""))
    if order is not None:
        for seg in order.all("DG1"):
            code = order.value(seg, 3)
            value = order.field(seg, 3)
            if not value or code in seen:
                continue
            seen.add(code)
            kind = order.value(seg, 6)
            out.append(_dg1(len(out) + 1, value, literal(kind if kind in _DG1_TYPES else "W")))
    return out


_DG1_TYPES = frozenset({"A", "W", "F"})  # table 0052: admitting, working, final


def _dg1(n: int, coding: Er7 | None, kind: Er7) -> Seg:
    return Seg("DG1").set(1, literal(str(n))).set(3, coding).set(6, kind)


_IN1_FIELDS = (2, 3, 4, 8, 9, 12, 13, 15, 36, 49)


def insurance(data: Data, order: Source | None) -> tuple[list[Seg], str | None]:
    """IN1 segments, and the coverage as text when no IN1 can carry it (see the module
    docstring): the order's IN1s, enriched with the canonical payer/plan/member id."""
    payer = data.text("insurance.payer")
    plan = data.text("insurance.plan")
    member = data.ident("insurance.member_id")
    copied: list[Seg] = []
    if order is not None:
        for seg in order.all("IN1"):
            in1 = Seg("IN1").set(1, literal(str(len(copied) + 1)))
            for n in _IN1_FIELDS:
                in1.set(n, order.field(seg, n))
            if in1.get(2) and in1.get(3):
                copied.append(in1)
    if not (payer or plan or member):
        return copied, None
    if copied:
        first = copied[0]
        if plan:
            code = (first.get(2) or "").split("^")[0]
            first.set(2, comps(Er7(code) if code else None, text(plan)))
        first.set(4, text(payer) or first.get(4))
        if member:
            first.set(36, text(str(member["value"]))).set(49, cx(member))
        return copied, None
    parts = [
        f"payer {payer}" if payer else "",
        f"plan {plan}" if plan else "",
        f"member ID {member['value']}" if member else "",
    ]
    return [], "Insurance: " + "; ".join(p for p in parts if p)
