"""The shipped HL7 v2 mappings give patient outreach its contact fields.

Fixtures (``mappings/**/tests/*.cases.yaml``) compare only the fields they list, so two
things are checked here instead: a message without contact data emits *no* contact field
at all (absent, not an empty string that would overwrite what the referral knows), and
what the mappings emit reaches :meth:`engine.policy.outreach.Contact.of` through the real
projection fold — an address outreach can use, cleared by HL7 ``""``, kept when a later
message is silent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.domain.events import Normalised
from engine.domain.projection import LoggedEvent, Referral, replay
from engine.mapping.mapset import load_mapping_set
from engine.policy.outreach import Contact

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
MAPSET = load_mapping_set(MAPPINGS)
RECEIVED = datetime(2025, 3, 4, 16, 15, 3, tzinfo=UTC)

CONTACT_FIELDS = (
    "patient.phone",
    "patient.email",
    "patient.language",
    "patient.timezone",
    "patient.contact_preference",
    "patient.consent.sms",
    "patient.consent.email",
)


def _normalise(*segments: str, overlay: str | None = None) -> Normalised:
    result = MAPSET.normalise("\r".join(segments), received_at=RECEIVED, overlay=overlay)
    errors = [d for d in result.diagnostics if d.severity == "error"]
    assert not errors, errors
    assert result.events
    return result


def _referral(*messages: Normalised) -> Referral:
    logged = [
        LoggedEvent(e.type, e.fields, RECEIVED, RECEIVED)
        for message in messages
        for e in message.events
    ]
    referral, _ = replay("r-1", logged)
    assert referral is not None
    return referral


ORM_NO_CONTACT = (
    "MSH|^~\\&|FAKE_EHR|FAKEHOSP|REFLOOP|HUB|20250304101500-0600||ORM^O01^ORM_O01|C-1|P|2.5.1",
    "PID|1||MRN0500^^^FAKEHOSP^MR||TESTPATIENT^NOCONTACT||19800101|F",
    "ORC|NW|REF-5000^FAKEEHR|||||||20250304101200-0600",
    "OBR|1|REF-5000^FAKEEHR||REFCARD^Cardiology referral^L",
)
REF_NO_CONTACT = (
    "MSH|^~\\&|FAKE_EHR|FAKEHOSP|REFLOOP|HUB|20250301100000-0500||REF^I12^REF_I12|C-2|P|2.5.1",
    "RF1|P|R|Med||O|RF-5001^FAKEEHR|||20250301100000-0500",
    "PID|1||MRN0501^^^FAKEHOSP^MR||TESTPATIENT^NOCONTACT||19750315|F",
)
EPIC_NO_CONTACT = (
    "MSH|^~\\&|EPIC|EPICHOSP|REFLOOP|HUB|20250304101500||ORM^O01|C-3|P|2.3",
    "PID|1||E1000050^^^^EPI||TESTPATIENT^NOCONTACT||19750612|F",
    "ORC|NW|55550^EPIC|||||^^^20250304101200^^R||20250304101200",
    "OBR|1|55550^EPIC||REF10^AMB REFERRAL TO CARDIOLOGY",
)


@pytest.mark.parametrize(
    ("segments", "overlay", "mapping"),
    [
        (ORM_NO_CONTACT, None, "hl7v2.orders"),
        (REF_NO_CONTACT, None, "hl7v2.referrals"),
        (EPIC_NO_CONTACT, "epic", "epic.orders"),
    ],
)
def test_a_message_without_contact_data_emits_no_contact_field(
    segments: tuple[str, ...], overlay: str | None, mapping: str
) -> None:
    result = _normalise(*segments, overlay=overlay)
    assert result.mapping_id == mapping
    event = result.events[0]
    assert event.type.value == "referral.created"
    assert [f for f in CONTACT_FIELDS if f in event.fields] == []
    assert [d.code for d in result.diagnostics if d.severity != "info"] == []


def test_an_order_with_home_cell_email_language_and_consent_reaches_outreach() -> None:
    order = _normalise(
        "MSH|^~\\&|FAKE_EHR|FAKEHOSP|REFLOOP|HUB|20250304101500-0600||ORM^O01^ORM_O01|C-4|P|2.5.1",
        "PID|1||MRN0502^^^FAKEHOSP^MR||TESTPATIENT^REACHED||19800101|F|||||"
        "^PRN^PH^^1^312^5550130~^ORN^CP^^1^312^5550131~^NET^Internet^reached@example.org"
        "||SPA^Spanish^ISO639",
        "CON|1|SMS^Text message reminders^L|||||||||A",
        "ORC|NW|REF-5002^FAKEEHR|||||||20250304101200-0600",
        "OBR|1|REF-5002^FAKEEHR||REFCARD^Cardiology referral^L",
    )
    contact = Contact.of(_referral(order))
    assert contact.phone == "+13125550131"  # the cell, not the home line
    assert contact.email == "reached@example.org"
    assert contact.language == "es"
    assert contact.sms_consent is True
    assert contact.email_consent is None  # no CON for e-mail: nothing recorded
    assert contact.timezone is None  # never mapped: [outreach] default_timezone applies
    assert contact.preference is None  # no v2.5.1 field; an overlay's business


def _change(pid_contact: str) -> Normalised:
    return _normalise(
        "MSH|^~\\&|FAKE_EHR|FAKEHOSP|REFLOOP|HUB|20250305090500-0600||ORM^O01^ORM_O01|C-6|P|2.5.1",
        f"PID|1||MRN0503^^^FAKEHOSP^MR||TESTPATIENT^CHANGED||19800101|F{pid_contact}",
        "ORC|XO|REF-5003^FAKEEHR|||||||20250305090000-0600",
        "OBR|1|REF-5003^FAKEEHR||REFCARD^Cardiology referral^L",
    )


def test_a_silent_change_keeps_the_phone_and_hl7_null_clears_it() -> None:
    created = _normalise(
        "MSH|^~\\&|FAKE_EHR|FAKEHOSP|REFLOOP|HUB|20250304101500-0600||ORM^O01^ORM_O01|C-5|P|2.3",
        "PID|1||MRN0503^^^FAKEHOSP^MR||TESTPATIENT^CHANGED||19800101|F|||||(312)555-0132||EN",
        "ORC|NW|REF-5003^FAKEEHR|||||||20250304101200-0600",
        "OBR|1|REF-5003^FAKEEHR||REFCARD^Cardiology referral^L",
    )
    assert Contact.of(_referral(created)).phone == "+13125550132"

    silent = _change("")  # no PID-13 at all: the referral keeps what it had
    kept = Contact.of(_referral(created, silent))
    assert (kept.phone, kept.language) == ("+13125550132", "en")

    cleared = _change('|||||""||""')  # PID-13 and PID-15 sent as HL7 null: delete them
    gone = Contact.of(_referral(created, silent, cleared))
    assert (gone.phone, gone.language) == (None, None)
