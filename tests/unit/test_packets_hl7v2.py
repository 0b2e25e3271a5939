"""HL7 v2 renderers: what each format carries, read back by path from messages that
python-hl7 and hl7apy (v2.5.1, STRICT) both parse; the ORC-5 crosswalk row by row;
escaping round trips; and RenderError reasons that name fields, never values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import MaxLengthReached
from hl7apy.parser import parse_message

from engine.domain.referral import Event, State
from engine.outbound.model import (
    PacketContext,
    Party,
    ReferralView,
    RenderError,
    Specialist,
    Target,
    TriggerEvent,
)
from engine.outbound.packets.hl7v2 import ORDER_STATUS, RENDERERS
from engine.outbound.packets.hl7v2_common import Er7, Seg, validate
from engine.protocol.hl7message import Message
from engine.protocol.hl7path import parse_path, read
from tests import loop_messages

TZ = timezone(timedelta(hours=-6))
NOW = datetime(2026, 12, 2, 11, 0, 5, tzinfo=TZ)
SAMPLES = Path(__file__).resolve().parents[2] / "mappings" / "hl7v2" / "samples" / "corpus"
MARKER = "ZZQPHIMARKER"

REFERRAL: dict[str, Any] = {
    "correlate.placer_order": {"value": "PO1", "namespace": "ACME"},
    "patient.identifier": {"value": "100001", "namespace": "ACME", "type": "MR"},
    "patient.name": {"family": "TESTPATIENT", "given": "ALPHA"},
    "patient.birth_date": "1980-01-01",
    "patient.sex": "female",
    "service": {"code": "REFCARD", "display": "Referral", "system": "L"},
    "specialty": "cardiology",
    "priority": "routine",
    "requested_at": "2026-11-20T10:12:00-06:00",
    "occurred_at": "2026-11-20T10:12:00-06:00",
    "source": "default",
}
APPOINTMENT: dict[str, Any] = {
    "appointment_id": {"value": "FA-PO1", "namespace": "CLINIC"},
    "status": "booked",
    "start": "2026-12-01T14:00:00-06:00",
    "end": "2026-12-01T14:30:00-06:00",
}
NOTE: dict[str, Any] = {
    "document_id": {"value": "CN-PO1", "namespace": "CARDIO_EMR"},
    "document_type": {"code": "11488-4", "display": "Consult note", "system": "LN"},
    "report_status": "final",
    "observed_at": "2026-12-01T14:30:00-06:00",
    "content_type": "TX",
}
CARDIOLOGY = Specialist(
    id="cardio-east",
    name="East Cardiology Associates",
    targets=(Target("cardio-mllp", "hl7v2.ref_i12"),),
    npi="1234567893",
    provider_names=("Heart, Harriet",),
)

ORDER = loop_messages.orm("O-1", "PO1").decode()
ORU = loop_messages.oru("R-1", "PO1").decode()
SIU = loop_messages.siu("S-1", "PO1").decode()
MDM = (SAMPLES / "MDM_T02" / "fhirconverter__MDM-T02-03.hl7").read_text()
ORU_MIXED = (SAMPLES / "ORU_R01" / "linuxforhealth__ORU-multiline-short-mixed.hl7").read_text()
ORU_PDF = (SAMPLES / "ORU_R01" / "dcm4che__ORU_R01-PDF.hl7").read_text(encoding="latin-1")

#: An order with what only the message carries: coverage, a second diagnosis, OBX.
RICH_ORDER = "\r".join(
    [
        "MSH|^~\\&|ACME_EHR|ACME_MAIN|REFLOOP|HUB|20261120101500-0600||ORM^O01^ORM_O01|O-2|P|2.5.1",
        "PID|1||100001^^^ACME^MR||TESTPATIENT^ALPHA||19800101|F",
        "IN1|1|GOLD^Gold plan^L|PAYER1^^^PAYERS|Acme Health||||GRP7||||20260101|20261231||HMO",
        "ORC|NW|PO1^ACME|||||^^^^^R||20261120101200-0600",
        "OBR|1|PO1^ACME||REFCARD^Referral^L",
        "DG1|1||R07.9^Chest pain, unspecified^I10|||F",
        "OBX|1|CE|8302-2^Prior cardiac workup^LN||Y^Yes^HL70136||||||F",
        "OBX|2|TX|11450-4^Problem list^LN||Palpitations at night \\T\\ on exertion||||||F",
    ]
)


def context(
    *,
    referral: Mapping[str, Any] | None = None,
    appointment: Mapping[str, Any] | None = None,
    note: Mapping[str, Any] | None = None,
    event: Event = Event.REFERRAL_CREATED,
    state: State = State.CREATED,
    fields: Mapping[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
    recipient: Specialist | None = CARDIOLOGY,
    options: Mapping[str, str] | None = None,
) -> PacketContext:
    data: dict[str, Mapping[str, Any]] = {"referral": REFERRAL if referral is None else referral}
    if appointment is not None:
        data["appointment"] = appointment
    if note is not None:
        data["consult_note"] = note
    created = datetime(2026, 11, 20, 10, 12, tzinfo=TZ)
    return PacketContext(
        delivery_id=7,
        idempotency_key="route-1/event-1",
        control_id="RL000007",
        now=NOW,
        referral=ReferralView("ref-1", state, created, NOW, data),
        event=TriggerEvent(
            id="event-1",
            type=event,
            fields=dict(fields or {}),
            occurred_at=datetime(2026, 12, 2, 10, 55, tzinfo=TZ),
            sequence=4,
            state_before=None,
            state_after=state,
        ),
        sender=Party("REFLOOP", "HUB"),
        receiver=Party("CARDIO_EMR", "EAST"),
        recipient=recipient,
        sources={"order": ORDER} if sources is None else sources,
        options=options or {},
    )


def with_referral(**changes: Any) -> dict[str, Any]:
    out = dict(REFERRAL)
    for name, value in changes.items():
        key = name.replace("__", ".")
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


#: One realistic context per format (the loop referral at the step that triggers it).
CASES: dict[str, PacketContext] = {
    "hl7v2.ref_i12": context(event=Event.REFERRAL_CREATED, state=State.CREATED),
    "hl7v2.omg_o19": context(event=Event.REFERRAL_CREATED, state=State.CREATED),
    "hl7v2.orm_status": context(
        appointment=APPOINTMENT, event=Event.APPOINTMENT_BOOKED, state=State.SCHEDULED
    ),
    "hl7v2.oru_note": context(
        appointment=APPOINTMENT,
        note=NOTE,
        event=Event.CONSULT_NOTE_RECEIVED,
        state=State.NOTE_RECEIVED,
        sources={"order": ORDER, "trigger": ORU},
    ),
    "hl7v2.mdm_note": context(
        appointment=APPOINTMENT,
        note=NOTE,
        event=Event.CONSULT_NOTE_RECEIVED,
        state=State.NOTE_RECEIVED,
        sources={"order": ORDER, "trigger": MDM},
    ),
}
MESSAGE_TYPES = {
    "hl7v2.ref_i12": "REF^I12^REF_I12",
    "hl7v2.omg_o19": "OMG^O19^OMG_O19",
    "hl7v2.orm_status": "ORM^O01^ORM_O01",
    "hl7v2.oru_note": "ORU^R01^ORU_R01",
    "hl7v2.mdm_note": "MDM^T02^MDM_T02",
}


def render(fmt: str, ctx: PacketContext) -> str:
    rendered = RENDERERS[fmt](ctx)
    return rendered.payload.decode("utf-8")


class Read:
    """A rendered message read back by path with the engine's lazy model (unescaped)."""

    def __init__(self, er7: str) -> None:
        self.er7 = er7
        self.message = Message.parse(er7)

    def __call__(self, path: str) -> str:
        value = read(self.message, parse_path(path))
        assert not isinstance(value, list)
        return self.message.unescape(value) if isinstance(value, str) else ""

    def all(self, path: str) -> list[str]:
        values = read(self.message, parse_path(path))
        assert isinstance(values, list)
        return [self.message.unescape(v) if isinstance(v, str) else "" for v in values]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.message.segments]


def strict_parse(er7: str) -> None:
    """hl7apy, v2.5.1 STRICT: parse (structure, datatypes, lengths, dates), then validate.
    hl7apy's validator checks a choice group like a sequence, so it rejects every
    ORM_O01 with an OBR (it wants RQD, RQ1, RXO, ODS and ODT too): parse only there."""
    message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    if message.name != "ORM_O01":
        assert message.validate()


def fails(fmt: str, ctx: PacketContext) -> str:
    with pytest.raises(RenderError) as caught:
        RENDERERS[fmt](ctx)
    return caught.value.reason


# -- every format ---------------------------------------------------------------------------------


def test_the_formats_are_exactly_these() -> None:
    assert set(RENDERERS) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_renders_a_message_both_parsers_accept(fmt: str) -> None:
    rendered = RENDERERS[fmt](CASES[fmt])
    er7 = rendered.payload.decode("utf-8")
    assert rendered.content_type == "x-application/hl7-v2+er7"
    assert rendered.metadata == {
        "control_id": "RL000007",
        "message_type": "^".join(MESSAGE_TYPES[fmt].split("^")[:2]),
    }
    assert "\n" not in er7
    assert er7.count("\r") == len(Read(er7).names) - 1
    parsed = hl7.parse(er7)
    assert str(parsed.segment("MSH")[9]) == MESSAGE_TYPES[fmt]
    strict_parse(er7)
    msg = Read(er7)
    assert (msg("MSH-3"), msg("MSH-4"), msg("MSH-5"), msg("MSH-6")) == (
        "REFLOOP",
        "HUB",
        "CARDIO_EMR",
        "EAST",
    )
    assert (msg("MSH-7"), msg("MSH-10"), msg("MSH-11"), msg("MSH-12")) == (
        "20261202110005-0600",
        "RL000007",
        "P",
        "2.5.1",
    )
    assert msg("MSH-18") == ""  # ASCII only
    assert (msg("PID-3.1"), msg("PID-3.4"), msg("PID-3.5")) == ("100001", "ACME", "MR")
    assert (msg("PID-5.1"), msg("PID-5.2"), msg("PID-7"), msg("PID-8")) == (
        "TESTPATIENT",
        "ALPHA",
        "19800101",
        "F",
    )


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_same_context_same_bytes(fmt: str) -> None:
    assert RENDERERS[fmt](CASES[fmt]).payload == RENDERERS[fmt](CASES[fmt]).payload


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_no_patient_identifier_names_the_field(fmt: str) -> None:
    ctx = CASES[fmt]
    data = dict(ctx.referral.data)
    data["referral"] = with_referral(patient__identifier=None)
    reason = fails(fmt, replace(ctx, referral=replace(ctx.referral, data=data)))
    assert reason.startswith("PID-3:")
    assert "patient.identifier" in reason
    assert "100001" not in reason
    assert "TESTPATIENT" not in reason


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_non_ascii_sets_msh_18_and_encodes_utf8(fmt: str) -> None:
    ctx = CASES[fmt]
    data = dict(ctx.referral.data)
    data["referral"] = with_referral(patient__name={"family": "Müller-Żółć", "given": "José"})
    payload = RENDERERS[fmt](replace(ctx, referral=replace(ctx.referral, data=data))).payload
    msg = Read(payload.decode("utf-8"))
    assert msg("MSH-18") == "UNICODE UTF-8"
    assert (msg("PID-5.1"), msg("PID-5.2")) == ("Müller-Żółć", "José")
    assert "Müller".encode() in payload


# -- escaping -------------------------------------------------------------------------------------

NASTY = "O|Brien^Jr&Co~2 \\ back\\slash \\F\\ literal"


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_delimiters_in_values_survive_a_round_trip(fmt: str) -> None:
    ctx = CASES[fmt]
    data = dict(ctx.referral.data)
    data["referral"] = with_referral(
        patient__name={"family": NASTY, "given": "A^B"},
        patient__identifier={"value": "10|0^1", "namespace": "AC&ME", "type": "MR"},
        correlate__placer_order={"value": "PO~1\\", "namespace": "ACME"},
    )
    er7 = render(fmt, replace(ctx, referral=replace(ctx.referral, data=data)))
    strict_parse(er7)
    msg = Read(er7)
    assert (msg("PID-5.1"), msg("PID-5.2")) == (NASTY, "A^B")
    assert (msg("PID-3.1"), msg("PID-3.4")) == ("10|0^1", "AC&ME")
    other = hl7.parse(er7)
    assert other["PID.F5.R1.C1"] == NASTY
    assert other["PID.F3.R1.C1"] == "10|0^1"
    placer_at = {
        "hl7v2.ref_i12": "RF1-6",
        "hl7v2.omg_o19": "ORC-2",
        "hl7v2.orm_status": "ORC-2",
        "hl7v2.oru_note": "OBR-2",
        "hl7v2.mdm_note": "TXA-14",
    }[fmt]
    assert (msg(f"{placer_at}.1"), msg(f"{placer_at}.2")) == ("PO~1\\", "ACME")


def test_line_breaks_become_br_in_ft_and_hex_elsewhere() -> None:
    ctx = context(referral=with_referral(reason="Chest pain\r\nat night", note="see\nletter"))
    er7 = render("hl7v2.ref_i12", ctx)
    assert "Chest pain\\.br\\at night" in er7  # NTE-3 is FT
    assert "^Chest pain\\X0D\\\\X0A\\at night" in er7  # RF1-10 CE text is ST
    msg = Read(er7)
    assert msg.all("NTE[*]-3") == ["Chest pain\nat night", "see\nletter"]
    assert msg("RF1-10.2") == "Chest pain\r\nat night"


def test_control_characters_cannot_break_a_segment_or_an_mllp_frame() -> None:
    ctx = context(referral=with_referral(patient__name={"family": "A\x0bB\x1cC\x0dD"}))
    er7 = render("hl7v2.ref_i12", ctx)
    assert not any(c in er7 for c in "\x0b\x1c\n")
    assert er7.count("\r") == len(Read(er7).names) - 1
    assert Read(er7)("PID-5.1") == "A\x0bB\x1cC\x0dD"


# -- REF^I12 --------------------------------------------------------------------------------------


def test_ref_i12_carries_the_referral() -> None:
    ctx = context(
        referral=with_referral(
            requester__name={"family": "PLACER", "given": "PAT"},
            requester__identifier={"value": "1112223334", "namespace": "NPI"},
            diagnosis={"code": "I10", "display": "Essential hypertension", "system": "I10"},
            reason="Chest pain on exertion",
            note="Please see within two weeks",
            referral_type="med",
            category="outpatient",
            disposition="WR",
        ),
        sources={"order": RICH_ORDER},
    )
    msg = Read(render("hl7v2.ref_i12", ctx))
    assert msg.names == [
        *("MSH", "RF1", "PRD", "PRD", "PID", "IN1", "DG1", "DG1"),
        *("OBR", "NTE", "NTE", "OBX", "OBX"),
    ]
    assert (msg("MSH-15"), msg("MSH-16")) == ("AL", "NE")
    assert (msg("RF1-1.1"), msg("RF1-2.1"), msg("RF1-3.1"), msg("RF1-4.1"), msg("RF1-5.1")) == (
        *("P", "R", "Med"),
        *("WR", "O"),
    )
    assert (msg("RF1-6.1"), msg("RF1-6.2"), msg("RF1-7")) == ("PO1", "ACME", "20261120101200-0600")
    assert msg("RF1-10.2") == "Chest pain on exertion"
    assert (msg("PRD[1]-1.1"), msg("PRD[1]-2.1"), msg("PRD[1]-7.1"), msg("PRD[1]-7.2")) == (
        *("RP", "PLACER"),
        *("1112223334", "NPI"),
    )
    assert (msg("PRD[2]-1.1"), msg("PRD[2]-2.1"), msg("PRD[2]-2.2")) == ("RT", "Heart", "Harriet")
    assert (msg("PRD[2]-7.1"), msg("PRD[2]-7.2")) == ("1234567893", "NPI")
    assert msg.all("DG1[*]-3.1") == ["I10", "R07.9"]
    assert msg.all("DG1[*]-6") == ["W", "F"]
    assert (msg("OBR-2.1"), msg("OBR-4.1"), msg("OBR-16.2")) == ("PO1", "REFCARD", "PLACER")
    assert msg.all("NTE[*]-3") == ["Chest pain on exertion", "Please see within two weeks"]
    # The order's own observations travel with it, renumbered, value types kept.
    assert msg.all("OBX[*]-2") == ["CE", "TX"]
    assert msg.all("OBX[*]-5") == ["Y^Yes^HL70136", "Palpitations at night & on exertion"]
    # Coverage: the order's IN1 (it has the company id IN1-3 requires).
    assert (msg("IN1-2.1"), msg("IN1-3.1"), msg("IN1-4")) == ("GOLD", "PAYER1", "Acme Health")


@pytest.mark.parametrize(
    ("priority", "rf1_2"),
    [("stat", "S"), ("asap", "A"), ("routine", "R"), ("urgent", "A"), ("whenever", "")],
)
def test_ref_i12_priority(priority: str, rf1_2: str) -> None:
    msg = Read(render("hl7v2.ref_i12", context(referral=with_referral(priority=priority))))
    assert msg("RF1-2.1") == rf1_2
    assert msg("RF1-2.3") == ("HL70280" if rf1_2 else "")


@pytest.mark.parametrize(
    ("sex", "pid_8"), [("female", "F"), ("male", "M"), ("other", "O"), ("unknown", "U"), ("x", "")]
)
def test_sex_back_to_table_0001(sex: str, pid_8: str) -> None:
    msg = Read(render("hl7v2.ref_i12", context(referral=with_referral(patient__sex=sex))))
    assert msg("PID-8") == pid_8


def test_ref_i12_falls_back_to_the_referral_number_and_needs_one() -> None:
    numbered = with_referral(
        correlate__placer_order=None,
        correlate__referral_id={"value": "R-77", "namespace": "2.16.840.1.113883.19.5"},
    )
    msg = Read(render("hl7v2.ref_i12", context(referral=numbered)))
    # An OID assigner goes in EI-3 with type ISO, as 360X writes it.
    assert (msg("RF1-6.1"), msg("RF1-6.2"), msg("RF1-6.3"), msg("RF1-6.4")) == (
        *("R-77", ""),
        *("2.16.840.1.113883.19.5", "ISO"),
    )
    reason = fails("hl7v2.ref_i12", context(referral=with_referral(correlate__placer_order=None)))
    assert reason.startswith("RF1-6:")


def test_ref_i12_without_a_directory_entry_uses_the_orders_recipient() -> None:
    named = with_referral(recipient__name={"family": "CARDIO", "given": "CLARA"})
    msg = Read(render("hl7v2.ref_i12", context(referral=named, recipient=None)))
    assert msg.all("PRD[*]-1.1") == ["RP", "RT"]
    assert msg("PRD[2]-2.1") == "CARDIO"
    msg = Read(render("hl7v2.ref_i12", context(recipient=None)))
    assert msg.all("PRD[*]-1.1") == ["RP"]


def test_ref_i12_practice_without_clinicians_is_a_display_name() -> None:
    practice = replace(CARDIOLOGY, provider_names=())
    msg = Read(render("hl7v2.ref_i12", context(recipient=practice)))
    assert (msg("PRD[2]-2.1"), msg("PRD[2]-2.7")) == ("East Cardiology Associates", "D")


def test_canonical_insurance_enriches_the_orders_in1() -> None:
    covered = with_referral(
        insurance__payer="Acme Health Plans",
        insurance__plan="Gold PPO",
        insurance__member_id={"value": "M-42", "namespace": "PAYER1"},
    )
    msg = Read(render("hl7v2.ref_i12", context(referral=covered, sources={"order": RICH_ORDER})))
    assert (msg("IN1-2.1"), msg("IN1-2.2"), msg("IN1-3.1")) == ("GOLD", "Gold PPO", "PAYER1")
    assert (msg("IN1-4"), msg("IN1-36"), msg("IN1-49.1")) == ("Acme Health Plans", "M-42", "M-42")


def test_canonical_insurance_without_a_company_id_travels_as_a_note() -> None:
    covered = with_referral(
        insurance__payer="Acme Health Plans",
        insurance__member_id={"value": "M-42", "namespace": "PAYER1"},
    )
    msg = Read(render("hl7v2.ref_i12", context(referral=covered)))
    assert "IN1" not in msg.names
    assert msg.all("NTE[*]-3") == ["Insurance: payer Acme Health Plans; member ID M-42"]


COVERED = with_referral(
    insurance__payer="Fake Health Plan",
    insurance__payer_id={"value": "FKP001", "namespace": "FAKENAIC", "type": "NIIP"},
    insurance__plan="FAKEPPO01",
    insurance__group="GRP-4455",
    insurance__member_id={"value": "MEM123456"},
)


@pytest.mark.parametrize("fmt", ["hl7v2.ref_i12", "hl7v2.omg_o19"])
def test_canonical_insurance_with_a_payer_id_builds_the_in1(fmt: str) -> None:
    er7 = render(fmt, context(referral=COVERED))  # the order has no IN1
    strict_parse(er7)
    msg = Read(er7)
    assert msg.names.count("IN1") == 1
    assert (msg("IN1-1"), msg("IN1-2.1"), msg("IN1-2.2")) == ("1", "", "FAKEPPO01")
    assert (msg("IN1-3.1"), msg("IN1-3.4"), msg("IN1-3.5")) == ("FKP001", "FAKENAIC", "NIIP")
    assert (msg("IN1-4.1"), msg("IN1-8"), msg("IN1-36")) == (
        "Fake Health Plan",
        "GRP-4455",
        "MEM123456",
    )
    assert msg("IN1-49") == ""  # IN1-49 is the institution's number for the insured
    assert not any(t.startswith("Insurance:") for t in msg.all("NTE[*]-3"))


def test_an_oid_payer_assigner_is_a_universal_id_in_in1_3() -> None:
    oid = {"value": "Org-12345", "namespace": "2.16.840.1.113883.1.1", "type": "NIIP"}
    er7 = render("hl7v2.ref_i12", context(referral={**COVERED, "insurance.payer_id": oid}))
    strict_parse(er7)
    assert "|Org-12345^^^&2.16.840.1.113883.1.1&ISO^NIIP|" in er7


def test_a_payer_id_that_is_also_the_payer_is_not_a_company_name() -> None:
    # No IN1-4 in the order message: the mappings put the company id in insurance.payer.
    covered = {**COVERED, "insurance.payer": "FKP001"}
    msg = Read(render("hl7v2.ref_i12", context(referral=covered)))
    assert (msg("IN1-3.1"), msg("IN1-4")) == ("FKP001", "")


def test_a_payer_id_without_a_plan_travels_as_a_note() -> None:
    covered = {k: v for k, v in COVERED.items() if k != "insurance.plan"}
    msg = Read(render("hl7v2.ref_i12", context(referral=covered)))
    assert "IN1" not in msg.names  # IN1-2 is required
    assert msg.all("NTE[*]-3") == [
        "Insurance: payer Fake Health Plan; payer ID FKP001; group GRP-4455; member ID MEM123456"
    ]


def test_a_payer_id_for_another_company_replaces_the_orders_in1_3() -> None:
    msg = Read(render("hl7v2.ref_i12", context(referral=COVERED, sources={"order": RICH_ORDER})))
    assert msg.names.count("IN1") == 1
    assert (msg("IN1-3.1"), msg("IN1-3.4"), msg("IN1-3.5")) == ("FKP001", "FAKENAIC", "NIIP")
    assert (msg("IN1-2.1"), msg("IN1-8")) == ("GOLD", "GRP-4455")  # the order's code stays
    same = {**COVERED, "insurance.payer_id": {"value": "PAYER1"}}
    msg = Read(render("hl7v2.ref_i12", context(referral=same, sources={"order": RICH_ORDER})))
    assert (msg("IN1-3.1"), msg("IN1-3.4")) == ("PAYER1", "PAYERS")  # the order's own CX


def test_copied_segments_are_reencoded_from_foreign_delimiters() -> None:
    # '#' fields, '!' components, '$' subcomponents: '|' and '^' are plain text there.
    foreign = "\r".join(
        [
            "MSH#!~\\$#ACME_EHR#ACME_MAIN#REFLOOP#HUB#20261120101500##ORM!O01#O-3#P#2.3",
            "PID#1##100001!!!ACME!MR##TESTPATIENT!ALPHA",
            "ORC#NW#PO1!ACME",
            "OBR#1#PO1!ACME##REFCARD!Referral!L",
            "DG1#1##R07.9!Chest pain | left^side!I10###W",
            "OBX#1#TX#11450-4!Problem list!LN##a|b^c & d \\T\\ e~second line##",
        ]
    )
    er7 = render("hl7v2.ref_i12", context(sources={"order": foreign}))
    strict_parse(er7)
    msg = Read(er7)
    assert msg("DG1-3.2") == "Chest pain | left^side"
    assert msg.all("OBX-5[*]") == ["a|b^c & d $ e", "second line"]
    assert msg("OBX-11") == "F"  # required: filled in when the source left it empty


def test_an_unreadable_order_source_is_a_render_error() -> None:
    reason = fails("hl7v2.ref_i12", context(sources={"order": "not hl7 at all"}))
    assert reason == "sources.order: not a readable HL7 v2 message"


# -- OMG^O19 --------------------------------------------------------------------------------------


def test_omg_o19_is_a_new_order() -> None:
    ctx = context(
        referral=with_referral(
            requester__name={"family": "PLACER", "given": "PAT"},
            requester__identifier={"value": "1112223334", "namespace": "NPI"},
            requester__organization="Acme Family Medicine",
            reason="Rule out angina",
            due_by="2026-12-15T17:00:00-06:00",
            priority="asap",
            correlate__filler_order={"value": "F-9", "namespace": "CARDIO"},
        ),
        sources={"order": RICH_ORDER},
    )
    msg = Read(render("hl7v2.omg_o19", ctx))
    assert msg.names == [
        *("MSH", "PID", "IN1", "ORC", "TQ1", "OBR", "NTE", "DG1", "OBX", "OBX"),
    ]
    assert (msg("MSH-15"), msg("MSH-16"), msg("MSH-21")) == ("AL", "NE", "")
    assert (msg("ORC-1"), msg("ORC-2.1"), msg("ORC-2.2"), msg("ORC-3.1")) == (
        *("NW", "PO1"),
        *("ACME", "F-9"),
    )
    assert (msg("ORC-9"), msg("ORC-12.1"), msg("ORC-12.2"), msg("ORC-21")) == (
        *("20261120101200-0600", "1112223334"),
        *("PLACER", "Acme Family Medicine"),
    )
    assert (msg("TQ1-8"), msg("TQ1-9.1"), msg("TQ1-9.3")) == ("20261215170000-0600", "A", "HL70485")
    assert (msg("OBR-2.1"), msg("OBR-2.2"), msg("OBR-4.1"), msg("OBR-31.2")) == (
        *("PO1", "ACME"),
        *("REFCARD", "Rule out angina"),
    )


def test_omg_o19_360x_profile() -> None:
    ctx = context(
        referral=with_referral(service=None, priority=None),
        sources={},
        options={"profile": "360X"},
    )
    msg = Read(render("hl7v2.omg_o19", ctx))
    assert (msg("MSH-15"), msg("MSH-16"), msg("MSH-21")) == ("NE", "NE", "360X")
    assert msg("OBR-4.1") == "57133-1"
    assert msg("OBR-4.3") == "LN"
    assert "TQ1" not in msg.names  # no deadline, no priority
    reason = fails("hl7v2.omg_o19", replace(ctx, options={}))
    assert reason.startswith("OBR-4:")


# -- ORM^O01 status write-back --------------------------------------------------------------------

E, S = Event, State
CROSSWALK = [
    (E.REFERRAL_SENT, S.SENT, "IP", "Referral sent to the specialist"),
    (E.REFERRAL_DELIVERED, S.SENT, "IP", "Referral sent to the specialist"),
    (E.REFERRAL_ACCEPTED, S.ACCEPTED, "IP", "Referral accepted by the specialist"),
    (E.AUTHORIZATION_PENDING, S.AUTH_PENDING, "HD", "Referral on hold: authorization pending"),
    (E.AUTHORIZATION_DENIED, S.AUTH_PENDING, "HD", "Referral on hold: authorization denied"),
    (E.APPOINTMENT_BOOKED, S.SCHEDULED, "SC", "Appointment scheduled for 2026-12-01 14:00"),
    (E.APPOINTMENT_RESCHEDULED, S.SCHEDULED, "SC", "Appointment rescheduled for 2026-12-01"),
    (E.APPOINTMENT_CANCELLED, S.APPOINTMENT_CANCELLED, "IP", "Appointment cancelled"),
    (E.APPOINTMENT_NO_SHOW, S.NO_SHOW, "IP", "Patient did not attend the appointment"),
    (E.APPOINTMENT_COMPLETED, S.COMPLETED, "IP", "Visit completed; consult note pending"),
    (E.CONSULT_NOTE_RECEIVED, S.NOTE_RECEIVED, "CM", "Consult note received"),
    (E.CONSULT_NOTE_AMENDED, S.NOTE_RECEIVED, "CM", "Consult note amended"),
    (E.REFERRAL_CLOSED, S.CLOSED, "CM", "Referral closed"),
    (E.REFERRAL_DECLINED, S.DECLINED, "CA", "Referral declined by the specialist"),
    (E.REFERRAL_CANCELLED, S.CANCELLED, "CA", "Referral cancelled"),
    (E.REFERRAL_ESCALATED, S.SCHEDULED, "SC", "Appointment scheduled"),
    # A booking that arrives after the visit: the state, not the event, decides.
    (E.APPOINTMENT_BOOKED, S.COMPLETED, "IP", "Visit completed; consult note pending"),
]


def test_the_crosswalk_covers_every_state_with_a_status() -> None:
    assert set(ORDER_STATUS) == set(State) - {State.CREATED}
    assert {row[1] for row in CROSSWALK} == set(ORDER_STATUS)


@pytest.mark.parametrize(("event", "state", "orc_5", "nte"), CROSSWALK)
def test_orm_status_crosswalk(event: Event, state: State, orc_5: str, nte: str) -> None:
    ctx = context(
        referral=with_referral(correlate__filler_order={"value": "F-9", "namespace": "CARDIO"}),
        appointment=APPOINTMENT,
        event=event,
        state=state,
    )
    er7 = render("hl7v2.orm_status", ctx)
    strict_parse(er7)
    msg = Read(er7)
    assert msg.names == ["MSH", "PID", "ORC", "OBR", "NTE"]
    assert (msg("ORC-1"), msg("ORC-5"), msg("ORC-9")) == ("SC", orc_5, "20261202105500-0600")
    assert (msg("ORC-2.1"), msg("ORC-2.2"), msg("ORC-3.1"), msg("ORC-3.2")) == (
        *("PO1", "ACME"),
        *("F-9", "CARDIO"),
    )
    assert (msg("OBR-2.1"), msg("OBR-3.1"), msg("OBR-4.1")) == ("PO1", "F-9", "REFCARD")
    assert msg("OBR-36") == ("20261201140000-0600" if orc_5 == "SC" else "")
    assert msg("NTE-3").startswith(nte)
    assert msg("NTE-2") == "L"


def test_orm_status_carries_the_status_reason_and_no_other_inbound_text() -> None:
    ctx = context(
        appointment={**APPOINTMENT, "location": f"Room {MARKER}"},
        event=Event.REFERRAL_DECLINED,
        state=State.DECLINED,
        fields={"status_reason": "Out of network", "note": f"free text {MARKER}"},
        referral=with_referral(note=f"order note {MARKER}", reason=f"reason {MARKER}"),
    )
    er7 = render("hl7v2.orm_status", ctx)
    msg = Read(er7)
    assert msg("NTE-3") == "Referral declined by the specialist. Reason: Out of network"
    assert msg("ORC-16.2") == "Out of network"
    assert MARKER not in er7


def test_orm_status_needs_the_placer_number() -> None:
    ctx = context(
        referral=with_referral(
            correlate__placer_order=None,
            correlate__referral_id={"value": f"R-{MARKER}", "namespace": "ACME"},
        ),
        event=Event.APPOINTMENT_BOOKED,
        state=State.SCHEDULED,
    )
    reason = fails("hl7v2.orm_status", ctx)
    assert reason.startswith("ORC-2:")
    assert "correlate.placer_order" in reason
    assert MARKER not in reason


def test_orm_status_has_nothing_to_say_for_a_new_referral() -> None:
    reason = fails("hl7v2.orm_status", context(event=Event.REFERRAL_UPDATED, state=State.CREATED))
    assert reason.startswith("ORC-5:")


def test_orm_status_takes_the_service_from_the_order_when_canonical_has_none() -> None:
    ctx = context(referral=with_referral(service=None), event=Event.REFERRAL_SENT, state=State.SENT)
    assert Read(render("hl7v2.orm_status", ctx))("OBR-4.1") == "REFCARD"
    reason = fails("hl7v2.orm_status", replace(ctx, sources={}))
    assert reason.startswith("OBR-4:")


# -- consult notes --------------------------------------------------------------------------------


def source_obx(er7: str, types: frozenset[str]) -> list[str]:
    """OBX-5 of the source's note OBX (with a value), unescaped: what must be copied."""
    msg = Message.parse(er7)
    out = []
    for seg in msg.all("OBX"):
        if (seg.field(2) or "") in types and seg.field(5):
            out.append(msg.unescape(seg.field(5) or ""))
    return out


NOTE_TYPES = frozenset({"TX", "FT", "ST", "ED"})


@pytest.mark.parametrize(
    ("trigger", "kinds", "strict"),
    [
        (ORU, ["TX"], True),
        (MDM, ["TX"] * 29, True),
        (ORU_MIXED, ["TX", "TX"], True),
        # hl7apy types OBX-5 as ST (199 characters) whatever OBX-2 says, so its STRICT
        # parser refuses any base64 ED; the renderer checks ED itself (see hl7v2_common).
        (ORU_PDF, ["ST", "ST", "ST", "ED"], False),
    ],
    ids=["loop-oru", "mdm-t02", "oru-mixed", "oru-pdf"],
)
@pytest.mark.parametrize("fmt", ["hl7v2.oru_note", "hl7v2.mdm_note"])
def test_note_content_is_copied_from_the_trigger(
    fmt: str, trigger: str, kinds: list[str], strict: bool
) -> None:
    ctx = replace(CASES[fmt], sources={"trigger": trigger})
    er7 = render(fmt, ctx)
    hl7.parse(er7)
    if strict:
        strict_parse(er7)
    else:
        with pytest.raises(MaxLengthReached):
            strict_parse(er7)
        tolerant = VALIDATION_LEVEL.TOLERANT
        assert parse_message(er7, validation_level=tolerant, find_groups=True).validate()
    msg = Read(er7)
    assert msg.all("OBX[*]-2") == kinds
    assert msg.all("OBX[*]-1") == [str(n) for n in range(1, len(kinds) + 1)]
    assert [m.split("~")[0] for m in msg.all("OBX[*]-5")] == [
        v.split("~")[0] for v in source_obx(trigger, NOTE_TYPES)
    ]
    assert all(code for code in msg.all("OBX[*]-3"))  # required: the document type fills gaps
    assert set(msg.all("OBX[*]-11")) == {"F"}


def test_an_ed_note_keeps_its_encapsulated_data() -> None:
    ctx = replace(CASES["hl7v2.oru_note"], sources={"trigger": ORU_PDF})
    msg = Read(render("hl7v2.oru_note", ctx))
    source = Message.parse(ORU_PDF)
    ed = next(s for s in source.all("OBX") if s.field(2) == "ED").field(5)
    assert msg("OBX[4]-5.4") == "Base64"
    assert msg("OBX[4]-5.5") == (ed or "").split("^")[4]


def test_oru_note_links_to_the_placer_order() -> None:
    ctx = replace(
        CASES["hl7v2.oru_note"],
        referral=replace(
            CASES["hl7v2.oru_note"].referral,
            data={
                "referral": with_referral(
                    correlate__filler_order={"value": "CN-PO1", "namespace": "CARDIO_EMR"}
                ),
                "consult_note": NOTE,
            },
        ),
    )
    msg = Read(render("hl7v2.oru_note", ctx))
    assert msg.names == ["MSH", "PID", "ORC", "OBR", "OBX"]
    assert (msg("ORC-1"), msg("ORC-2.1"), msg("ORC-3.1")) == ("RE", "PO1", "CN-PO1")
    assert (msg("OBR-2.1"), msg("OBR-2.2"), msg("OBR-3.1"), msg("OBR-3.2")) == (
        *("PO1", "ACME"),
        *("CN-PO1", "CARDIO_EMR"),
    )
    assert (msg("OBR-4.1"), msg("OBR-4.3"), msg("OBR-7"), msg("OBR-25")) == (
        *("11488-4", "LN"),
        *("20261201143000-0600", "F"),
    )
    assert msg("OBX-5") == "Synthetic consult note text."


def test_oru_note_amended_is_corrected() -> None:
    ctx = replace(
        CASES["hl7v2.oru_note"],
        event=replace(CASES["hl7v2.oru_note"].event, type=Event.CONSULT_NOTE_AMENDED),
    )
    assert Read(render("hl7v2.oru_note", ctx))("OBR-25") == "C"


def test_oru_note_default_document_type() -> None:
    ctx = replace(
        CASES["hl7v2.oru_note"],
        referral=replace(CASES["hl7v2.oru_note"].referral, data={"referral": REFERRAL}),
    )
    msg = Read(render("hl7v2.oru_note", ctx))
    assert (msg("OBR-4.1"), msg("OBR-4.2"), msg("OBR-4.3")) == ("11488-4", "Consult note", "LN")


@pytest.mark.parametrize("fmt", ["hl7v2.oru_note", "hl7v2.mdm_note"])
@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"trigger": SIU}, "no note content: the trigger message carries no OBX"),
        ({"trigger": ORU.split("\rOBX")[0]}, "no note content: the trigger message carries no OBX"),
        ({}, "no note content: the delivery has no trigger message"),
    ],
    ids=["siu", "oru-without-obx", "none"],
)
def test_no_note_content(fmt: str, sources: dict[str, str], expected: str) -> None:
    assert fails(fmt, replace(CASES[fmt], sources=sources)) == expected


def test_mdm_note_is_a_document_notification() -> None:
    msg = Read(render("hl7v2.mdm_note", CASES["hl7v2.mdm_note"]))
    assert msg.names[:7] == ["MSH", "EVN", "PID", "PV1", "ORC", "OBR", "TXA"]
    assert set(msg.names[7:]) == {"OBX"}
    assert (msg("EVN-1"), msg("PV1-2")) == ("T02", "O")
    assert (msg("TXA-2"), msg("TXA-3"), msg("TXA-4")) == ("CN", "TX", "20261201143000-0600")
    assert (msg("TXA-12.1"), msg("TXA-12.2"), msg("TXA-13")) == ("CN-PO1", "CARDIO_EMR", "")
    assert (msg("TXA-14.1"), msg("TXA-14.2"), msg("TXA-17"), msg("TXA-19")) == (
        *("PO1", "ACME"),
        *("AU", "AV"),
    )
    assert msg("OBX[29]-5").startswith("Reminder shofar")


@pytest.mark.parametrize(
    ("parent", "trigger"),
    [({"value": "CN-PO1", "namespace": "CARDIO_EMR"}, "T10"), (None, "T08")],
)
def test_mdm_note_amendment(parent: dict[str, str] | None, trigger: str) -> None:
    base = CASES["hl7v2.mdm_note"]
    fields = {"document_id": {"value": "CN-PO1-2", "namespace": "CARDIO_EMR"}}
    if parent:
        fields["parent_document_id"] = parent
    ctx = replace(base, event=replace(base.event, type=Event.CONSULT_NOTE_AMENDED, fields=fields))
    rendered = RENDERERS["hl7v2.mdm_note"](ctx)
    msg = Read(rendered.payload.decode())
    assert msg("MSH-9.1") == "MDM"
    assert msg("MSH-9.2") == trigger
    assert msg("MSH-9.3") == "MDM_T02"
    assert rendered.metadata["message_type"] == f"MDM^{trigger}"
    assert (msg("EVN-1"), msg("TXA-12.1"), msg("TXA-13.1")) == (
        *(trigger, "CN-PO1-2"),
        "CN-PO1" if parent else "",
    )


def test_mdm_note_needs_a_document_id() -> None:
    base = CASES["hl7v2.mdm_note"]
    no_id = {k: v for k, v in NOTE.items() if k != "document_id"}
    data = {"referral": REFERRAL, "consult_note": no_id}
    ctx = replace(base, referral=replace(base.referral, data=data))
    # The MDM trigger still has its TXA-12 …
    assert Read(render("hl7v2.mdm_note", ctx))("TXA-12.1") == "2RWRVAJ627408"
    # … an ORU has none.
    reason = fails("hl7v2.mdm_note", replace(ctx, sources={"trigger": ORU}))
    assert reason.startswith("TXA-12:")


@pytest.mark.parametrize("fmt", ["hl7v2.oru_note", "hl7v2.mdm_note"])
def test_note_write_back_needs_the_placer_number(fmt: str) -> None:
    base = CASES[fmt]
    data = {"referral": with_referral(correlate__placer_order=None), "consult_note": NOTE}
    reason = fails(fmt, replace(base, referral=replace(base.referral, data=data)))
    assert ("OBR-2:" if fmt == "hl7v2.oru_note" else "TXA-14:") in reason


# -- validation and PHI-free reasons --------------------------------------------------------------


def test_hl7apy_length_failure_names_the_field_not_the_value() -> None:
    long_name = {"family": MARKER * 20, "given": "ALPHA"}  # 240 > ST's 199
    reason = fails("hl7v2.ref_i12", context(referral=with_referral(patient__name=long_name)))
    assert reason == "PID-5: rejected by hl7apy (MaxLengthReached)"


def test_bad_canonical_datetime_names_the_canonical_field() -> None:
    reason = fails("hl7v2.omg_o19", context(referral=with_referral(requested_at=MARKER)))
    assert reason == "requested_at: not an ISO 8601 date/time"


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_no_phi_in_any_reason(fmt: str) -> None:
    """Every failure path with the patient's data replaced by a marker."""
    phi = with_referral(
        patient__name={"family": MARKER, "given": MARKER},
        patient__birth_date="1980-01-01",
        requester__name={"family": MARKER},
        reason=MARKER,
        note=MARKER,
    )
    ctx = CASES[fmt]
    breakers = [
        {"patient.identifier": None},
        {"correlate.placer_order": None, "correlate.referral_id": None},
        {"patient.name": None},
        {"patient.identifier": {"value": MARKER * 20, "namespace": "ACME"}},
        {"service": None},
    ]
    reasons = []
    for change in breakers:
        data = dict(ctx.referral.data)
        data["referral"] = {k: v for k, v in {**phi, **change}.items() if v is not None}
        try:
            RENDERERS[fmt](replace(ctx, referral=replace(ctx.referral, data=data)))
        except RenderError as exc:
            reasons.append(exc.reason)
    assert len(reasons) == 4
    assert not [r for r in reasons if MARKER in r or "1980" in r]


def test_segment_order_is_checked() -> None:
    def seg(name: str, *values: str) -> Seg:
        out = Seg(name)
        for n, value in enumerate(values, 3 if name == "MSH" else 1):
            out.set(n, Er7(value) if value else None)
        return out

    header = seg("MSH", "A", "B", "C", "D", "20261202", "", "REF^I12^REF_I12", "1", "P", "2.5.1")
    rf1 = seg("RF1", "P", "", "", "", "", "PO1")
    prd = seg("PRD", "RP")
    patient = seg("PID", "1", "", "1^^^A^MR", "", "X^Y")
    validate([header, rf1, prd, patient])
    with pytest.raises(RenderError) as caught:
        validate([header, patient, rf1, prd])
    assert caught.value.reason == "PID: out of place in REF_I12 (after MSH)"
    with pytest.raises(RenderError) as caught:
        validate([header, rf1, prd])
    assert caught.value.reason == "PID: required but missing (hl7apy ValidationError)"


def test_a_policy_notice_to_the_referrer_says_why_it_comes() -> None:
    ctx = context(
        event=Event.REFERRAL_ESCALATED,
        state=State.SENT,
        fields={"escalation.reason": "unscheduled_21d", "escalation.notify": "referrer"},
    )
    msg = Read(render("hl7v2.orm_status", ctx))
    assert msg("ORC-5") == ORDER_STATUS[State.SENT]  # the referral's own status
    assert msg("NTE-3") == (
        "Referral needs attention (unscheduled 21d). Referral sent to the specialist"
    )
