"""What the HL7 v2 packets take from the order message beside the canonical fields (pure).

The referral's canonical fields say what the order meant; the order message
(``ctx.sources["order"]``) also holds what they leave out: the requested service as
the EHR coded it (OBR-4), every diagnosis (DG1) and the coverage (IN1). These are
copied field by field (:class:`~engine.outbound.packets.hl7v2_copy.Source`), trimmed to
v2.5.1, with the canonical values first or on top.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    """IN1 segments, and the coverage as text when no IN1 can carry it.

    IN1-2 (plan) and IN1-3 (company id, CX) are required in v2.5.1. The order's own IN1s
    are copied (those that have both), the first enriched with the canonical values; a
    canonical payer id naming another company than the copied IN1-3 (the coverage changed
    since the order) replaces it. Without a usable IN1 in the order, one is built from
    the canonical fields when they hold a payer id and a plan; otherwise the coverage
    travels as an NTE line rather than being dropped."""
    c = _Coverage.read(data)
    copied: list[Seg] = []
    first_company = ""
    if order is not None:
        for seg in order.all("IN1"):
            in1 = Seg("IN1").set(1, literal(str(len(copied) + 1)))
            for n in _IN1_FIELDS:
                in1.set(n, order.field(seg, n))
            if in1.get(2) and in1.get(3):
                first_company = first_company or order.value(seg, 3)
                copied.append(in1)
    if not c.known:
        return copied, None
    if copied:
        c.enrich(copied[0], first_company)
        return copied, None
    if c.payer_id is not None and c.plan:
        return [c.in1()], None
    return [], c.note()


@dataclass(frozen=True, slots=True)
class _Coverage:
    """The referral's canonical primary coverage (mappings/README.md "Insurance")."""

    payer: str | None
    payer_id: Mapping[str, Any] | None
    plan: str | None
    member: Mapping[str, Any] | None
    group: str | None

    @classmethod
    def read(cls, data: Data) -> _Coverage:
        return cls(
            payer=data.text("insurance.payer"),
            payer_id=data.ident("insurance.payer_id"),
            plan=data.text("insurance.plan"),
            member=data.ident("insurance.member_id"),
            group=data.text("insurance.group"),
        )

    @property
    def known(self) -> bool:
        return any((self.payer, self.payer_id, self.plan, self.member, self.group))

    @property
    def payer_name(self) -> str | None:
        # insurance.payer falls back to the company id when IN1-4 has no name: an id is
        # not a name, so IN1-4 stays empty then.
        if self.payer_id is not None and self.payer == self.payer_id["value"]:
            return None
        return self.payer

    def enrich(self, in1: Seg, company: str) -> None:
        if self.plan:
            code = (in1.get(2) or "").split("^")[0]
            in1.set(2, comps(Er7(code) if code else None, text(self.plan)))
        if self.payer_id is not None and self.payer_id["value"] != company:
            in1.set(3, cx(self.payer_id))
        in1.set(4, text(self.payer_name) or in1.get(4))
        in1.set(8, text(self.group) or in1.get(8))
        if self.member:
            in1.set(36, text(str(self.member["value"]))).set(49, cx(self.member))

    def in1(self) -> Seg:
        return (
            Seg("IN1")
            .set(1, literal("1"))
            .set(2, comps(None, text(self.plan)))
            .set(3, cx(self.payer_id))
            .set(4, text(self.payer_name))
            .set(8, text(self.group))
            .set(36, text(str(self.member["value"])) if self.member else None)
        )

    def note(self) -> str:
        parts = [
            f"payer {self.payer_name}" if self.payer_name else "",
            f"payer ID {self.payer_id['value']}" if self.payer_id else "",
            f"plan {self.plan}" if self.plan else "",
            f"group {self.group}" if self.group else "",
            f"member ID {self.member['value']}" if self.member else "",
        ]
        return "Insurance: " + "; ".join(p for p in parts if p)
