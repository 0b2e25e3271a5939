"""FHIR R4 packets: the referral bundle and the status write-back.

Contexts come two ways: the test loop (tests/loop_messages.py) normalised by the shipped
mappings and folded by the real projection, so the renderers see exactly what the engine
stores; and hand-built projections for the cases the loop does not reach. Every bundle
is checked against the fhir.resources R4B models, as the renderer itself does.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from fhir.resources.R4B.bundle import Bundle

from engine.domain.projection import LoggedEvent, Referral, fold
from engine.domain.referral import BSER, Event, State
from engine.mapping.mapset import load_mapping_set
from engine.outbound.model import (
    PacketContext,
    Party,
    ReferralView,
    RenderError,
    Specialist,
    TriggerEvent,
)
from engine.outbound.packets.fhir import (
    RENDERERS,
    render_referral_bundle,
    render_status_update,
    search_token,
    system_for,
)
from tests import loop_messages as lm
from tests.helpers import MAPPINGS

CORPUS = Path(__file__).resolve().parents[2] / "mappings" / "hl7v2" / "samples" / "corpus"
NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
RID = "8d3f1c52-0000-4000-8000-000000000001"
MARKER = "ZZMARKERNAME"  # a patient name that must never reach an error reason
SPECIALIST = Specialist(id="cardio-1", name="Cardiology Associates", targets=(), npi="1234567893")
MAPSET = load_mapping_set(MAPPINGS)


# -- building contexts -----------------------------------------------------------------


def make_ctx(
    data: Mapping[str, Mapping[str, Any]],
    *,
    state: State = State.CREATED,
    event: Event = Event.REFERRAL_CREATED,
    fields: Mapping[str, Any] | None = None,
    before: State | None = None,
    after: State | None = None,
    sources: Mapping[str, str] | None = None,
    options: Mapping[str, str] | None = None,
    recipient: Specialist | None = SPECIALIST,
    now: datetime = NOW,
    referral_id: str = RID,
    delivery_id: int = 1,
) -> PacketContext:
    view = ReferralView(referral_id, state, NOW - timedelta(days=10), NOW, data)
    trigger = TriggerEvent("ev-1", event, fields or {}, NOW, 1, before, after or state)
    return PacketContext(
        delivery_id=delivery_id,
        idempotency_key=f"key-{delivery_id}",
        control_id=f"C{delivery_id}",
        now=now,
        referral=view,
        event=trigger,
        sender=Party(facility="ACME_MAIN"),
        receiver=Party("EHR", "ACME"),
        recipient=recipient,
        sources=sources or {},
        options=options or {},
    )


def loop_contexts(placer: str = "PO1", *, note_status: str = "F") -> list[PacketContext]:
    """One context per event of the test loop, each seeing the referral right after it."""
    messages = [*lm.loop(placer)[:3], lm.oru(f"{placer}-R", placer, status=note_status)]
    referral: Referral | None = None
    out = []
    for raw in messages:
        normalised = MAPSET.normalise(raw.decode(), received_at=NOW)
        assert normalised.events, normalised.diagnostics
        for ev in normalised.events:
            referral, step = fold(referral, RID, LoggedEvent(ev.type, ev.fields, NOW, NOW))
            assert referral is not None
            view = ReferralView(
                referral.id,
                referral.state,
                referral.created_at,
                referral.updated_at,
                referral.data,
            )
            trigger = TriggerEvent(
                f"ev-{step.sequence}",
                ev.type,
                ev.fields,
                NOW,
                step.sequence,
                step.state_before,
                step.state_after,
            )
            out.append(
                PacketContext(
                    delivery_id=step.sequence,
                    idempotency_key=f"key-{step.sequence}",
                    control_id=f"C{step.sequence}",
                    now=NOW,
                    referral=view,
                    event=trigger,
                    sender=Party(facility="ACME_MAIN"),
                    receiver=Party("EHR", "ACME"),
                    recipient=SPECIALIST,
                    sources={"order": messages[0].decode(), "trigger": raw.decode()},
                )
            )
    return out


ORDER = "\r".join(
    [
        lm.orm("ORD7", "PO7", mrn="100007").decode(),
        "DG1|1||R07.9^Chest pain, unspecified^I10||20261120|F",
        "DG1|2||I10^Essential hypertension (again)^I10||20261120|F",
        "OBX|1|ED|57133-1^Referral note^LN||^AP^PDF^Base64^JVBERi0xLjQK||||||F",
    ]
)

RICH: dict[str, dict[str, Any]] = {
    "referral": {
        "correlate.placer_order": {"value": "PO7", "namespace": "ACME"},
        "correlate.filler_order": {"value": "F7", "namespace": "CARDIO"},
        "patient.identifier": {"value": "100007", "namespace": "ACME", "type": "MR"},
        "patient.name": {"family": "TESTPATIENT", "given": "BRAVO", "middle": "Q"},
        "patient.birth_date": "1975-05-05",
        "patient.sex": "male",
        "service": {"code": "REFCARD", "display": "Referral", "system": "L"},
        "specialty": "cardiology",
        "priority": "urgent",
        "requested_at": "2026-11-20T10:12:00-06:00",
        "due_by": "2026-12-20T00:00:00-06:00",
        "requester.identifier": {"value": "1111111111", "namespace": "NPI"},
        "requester.name": {"family": "WELBY", "given": "MARCUS"},
        "requester.organization": "ACME Family Medicine",
        "diagnosis": {"code": "I10", "display": "Essential hypertension", "system": "I10"},
        "reason": "Chest pain on exertion",
        "note": "Please see within 2 weeks.",
        "insurance.payer": "Acme Health Plan",
        "insurance.plan": "Gold PPO",
        "insurance.member_id": {"value": "M123", "namespace": "AHP"},
    }
}


# -- reading bundles -------------------------------------------------------------------


def bundle_of(payload: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(payload)
    Bundle.model_validate(data)
    assert data["resourceType"] == "Bundle"
    assert data["type"] == "transaction"
    return data


def entries(bundle: Mapping[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def only(bundle: Mapping[str, Any], rtype: str) -> dict[str, Any]:
    found = entries(bundle, rtype)
    assert len(found) == 1, f"{len(found)} {rtype} entries"
    return found[0]


def by_url(bundle: Mapping[str, Any], url: str) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e.get("fullUrl") == url)


def match_of(query: str) -> tuple[str, str]:
    """(system, value) of an ``identifier=system|value`` search, unescaped."""
    token = unquote(query.split("identifier=", 1)[1])
    system, _, value = token.partition("|")
    return system, value.replace("\\|", "|").replace("\\,", ",")


def carries(resource: Mapping[str, Any], system: str, value: str) -> bool:
    return any(
        i.get("system") == system and i.get("value") == value
        for i in resource.get("identifier", [])
    )


def decoded(attachment: Mapping[str, Any]) -> bytes:
    return base64.b64decode(attachment["data"])


# -- the registry ----------------------------------------------------------------------


def test_both_formats_are_registered() -> None:
    assert {
        "fhir.referral_bundle": render_referral_bundle,
        "fhir.status_update": render_status_update,
    } == RENDERERS


# -- fhir.referral_bundle --------------------------------------------------------------


def test_referral_bundle_validates_and_is_byte_for_byte_deterministic() -> None:
    ctx = make_ctx(RICH, sources={"order": ORDER})
    first, second = render_referral_bundle(ctx), render_referral_bundle(ctx)
    assert first.payload == second.payload
    assert first.content_type == "application/fhir+json"
    assert first.metadata == {"fhir_method": "POST", "fhir_url": ""}
    bundle_of(first.payload)
    # Compact canonical JSON: sorted keys, no whitespace between tokens.
    text = first.payload.decode("utf-8")
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def test_the_same_referral_always_gets_the_same_full_urls() -> None:
    a = bundle_of(render_referral_bundle(make_ctx(RICH, sources={"order": ORDER})).payload)
    later = make_ctx(RICH, sources={"order": ORDER}, now=NOW + timedelta(days=2), delivery_id=9)
    b = bundle_of(render_referral_bundle(later).payload)
    other = make_ctx(RICH, sources={"order": ORDER}, referral_id="another-referral")
    c = bundle_of(render_referral_bundle(other).payload)
    urls = [e["fullUrl"] for e in a["entry"]]
    assert all(u.startswith("urn:uuid:") for u in urls)
    assert len(set(urls)) == len(urls)
    assert urls == [e["fullUrl"] for e in b["entry"]]
    assert not set(urls) & {e["fullUrl"] for e in c["entry"]}


def test_every_entry_is_a_conditional_create_on_an_identifier_it_carries() -> None:
    bundle = bundle_of(render_referral_bundle(make_ctx(RICH, sources={"order": ORDER})).payload)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert {"Patient", "ServiceRequest", "Task", "Coverage", "Condition"} <= set(kinds)
    for entry in bundle["entry"]:
        request = entry["request"]
        assert request["method"] == "POST"
        assert request["url"] == entry["resource"]["resourceType"]
        system, value = match_of(request["ifNoneExist"])
        assert system, f"{request['url']} matched on a bare value"
        assert carries(entry["resource"], system, value), request


def test_service_request_is_bser_shaped() -> None:
    ctx = make_ctx(RICH, sources={"order": ORDER})
    bundle = bundle_of(render_referral_bundle(ctx).payload)
    sr_entry = only(bundle, "ServiceRequest")
    sr = sr_entry["resource"]
    patient_url = only(bundle, "Patient")["fullUrl"]
    assert sr["status"] == "active"
    assert sr["intent"] == "order"
    placer = next(i for i in sr["identifier"] if i["type"]["coding"][0]["code"] == "PLAC")
    assert placer["system"] == "urn:refloop:assigner:ACME"
    assert placer["value"] == "PO7"
    assert placer["assigner"] == {"display": "ACME"}
    filler = next(
        i
        for i in sr["identifier"]
        if i.get("type", {}).get("coding", [{}])[0].get("code") == "FILL"
    )
    assert filler["value"] == "F7"
    assert carries(sr, "urn:refloop:referral", RID)
    assert sr["category"][0]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "3457005",
        "display": "Patient referral",
    }
    assert sr["code"]["coding"][0]["code"] == "REFCARD"
    assert sr["priority"] == "urgent"
    assert sr["subject"] == {"reference": patient_url}
    assert sr["authoredOn"] == "2026-11-20T10:12:00-06:00"
    assert sr["reasonCode"] == [{"text": "Chest pain on exertion"}]
    assert sr["note"] == [{"text": "Please see within 2 weeks."}]
    assert sr["occurrencePeriod"] == {"end": "2026-12-20T00:00:00-06:00"}

    # performer: the directory's organisation, by NPI
    performer = by_url(bundle, sr["performer"][0]["reference"])
    assert performer["resourceType"] == "Organization"
    assert performer["name"] == "Cardiology Associates"
    assert carries(performer, "http://hl7.org/fhir/sid/us-npi", "1234567893")
    assert carries(performer, "urn:refloop:directory", "cardio-1")
    # requester: a clinician at an organisation → a PractitionerRole joining both
    role = by_url(bundle, sr["requester"]["reference"])
    assert role["resourceType"] == "PractitionerRole"
    practitioner = by_url(bundle, role["practitioner"]["reference"])
    assert carries(practitioner, "http://hl7.org/fhir/sid/us-npi", "1111111111")
    assert practitioner["name"] == [{"family": "WELBY", "given": ["MARCUS"]}]
    assert by_url(bundle, role["organization"]["reference"])["name"] == "ACME Family Medicine"

    # insurance → Coverage
    coverage = by_url(bundle, sr["insurance"][0]["reference"])
    assert coverage["payor"] == [{"display": "Acme Health Plan"}]
    assert coverage["subscriberId"] == "M123"
    assert coverage["beneficiary"] == {"reference": patient_url}
    assert coverage["class"][0]["value"] == "Gold PPO"

    # diagnoses: the canonical one, then DG1 from the order, the repeat dropped
    codes = [by_url(bundle, r["reference"])["code"]["coding"][0] for r in sr["reasonReference"]]
    assert [(c["system"], c["code"]) for c in codes] == [
        ("http://hl7.org/fhir/sid/icd-10", "I10"),
        ("http://hl7.org/fhir/sid/icd-10", "R07.9"),
    ]
    # the order's ED OBX → a supporting DocumentReference
    doc = by_url(bundle, sr["supportingInfo"][0]["reference"])
    assert doc["content"][0]["attachment"]["contentType"] == "application/pdf"
    assert decoded(doc["content"][0]["attachment"]) == b"%PDF-1.4\n"
    assert doc["type"]["coding"][0] == {
        "code": "57133-1",
        "display": "Referral note",
        "system": "http://loinc.org",
    }


def test_task_follows_the_service_request() -> None:
    bundle = bundle_of(render_referral_bundle(make_ctx(RICH)).payload)
    sr_url = only(bundle, "ServiceRequest")["fullUrl"]
    sr = by_url(bundle, sr_url)
    task = only(bundle, "Task")["resource"]
    assert task["intent"] == "order"
    assert task["code"]["coding"] == [
        {"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}
    ]
    assert task["focus"] == {"reference": sr_url}
    assert task["basedOn"] == [{"reference": sr_url}]
    assert task["for"] == sr["subject"]
    assert task["requester"] == sr["requester"]
    assert task["owner"] == sr["performer"][0]
    assert task["lastModified"] == NOW.isoformat()
    assert carries(task, "urn:refloop:referral", RID)


@pytest.mark.parametrize("state", list(BSER), ids=str)
def test_task_status_and_business_status_for_every_state(state: State) -> None:
    status, code = BSER[state]
    bundle = bundle_of(render_referral_bundle(make_ctx(RICH, state=state)).payload)
    task = only(bundle, "Task")["resource"]
    assert task["status"] == status
    coding = task["businessStatus"]["coding"][0]
    assert coding["code"] == code
    assert coding["system"] == "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"

    update = make_ctx(RICH, state=state, event=Event.REFERRAL_UPDATED, after=state)
    written = only(bundle_of(render_status_update(update).payload), "Task")["resource"]
    assert (written["status"], written["businessStatus"]["coding"][0]["code"]) == (status, code)


def test_the_loop_order_becomes_a_bundle() -> None:
    ctx = loop_contexts()[0]
    assert ctx.event.type is Event.REFERRAL_CREATED
    bundle = bundle_of(render_referral_bundle(ctx).payload)
    patient = only(bundle, "Patient")
    assert patient["request"]["ifNoneExist"] == "identifier=urn:refloop:assigner:ACME|100001"
    res = patient["resource"]
    assert res["identifier"][0]["type"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
        "code": "MR",
    }
    assert res["name"] == [{"family": "TESTPATIENT", "given": ["ALPHA"]}]
    assert res["birthDate"] == "1980-01-01"
    assert res["gender"] == "female"
    task = only(bundle, "Task")["resource"]
    assert (task["status"], task["businessStatus"]["coding"][0]["code"]) == ("requested", "2.0")
    assert entries(bundle, "Coverage") == []  # no insurance known: no Coverage


def with_insurance(**fields: Any) -> dict[str, dict[str, Any]]:
    return {"referral": {**RICH["referral"], **fields}}


def coverage_of(ctx: PacketContext) -> dict[str, Any]:
    resource: dict[str, Any] = only(bundle_of(render_referral_bundle(ctx).payload), "Coverage")[
        "resource"
    ]
    return resource


def test_the_payer_id_is_the_coverage_payors_identifier() -> None:
    payer_id = {"value": "FKP001", "namespace": "FAKENAIC", "type": "NIIP"}
    coverage = coverage_of(make_ctx(with_insurance(**{"insurance.payer_id": payer_id})))
    assert coverage["payor"] == [
        {
            "type": "Organization",
            "identifier": {
                "system": "urn:refloop:assigner:FAKENAIC",
                "value": "FKP001",
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NIIP"}
                    ]
                },
            },
            "display": "Acme Health Plan",
        }
    ]


@pytest.mark.parametrize("payer", ["FKB003", None])
def test_a_payer_id_alone_makes_a_coverage_and_is_not_its_own_name(payer: str | None) -> None:
    # No IN1-4: the mappings put the company id in insurance.payer as well.
    data = with_insurance(**{"insurance.payer": payer, "insurance.payer_id": {"value": "FKB003"}})
    if payer is None:
        del data["referral"]["insurance.payer"]
    assert coverage_of(make_ctx(data))["payor"] == [
        {"type": "Organization", "identifier": {"value": "FKB003"}}
    ]


def test_the_corpus_ref_i12_payer_reaches_coverage_with_its_oid() -> None:
    # Mapping to bundle: IN1-3 Org-12345^^^&2.16.840.1.113883.1.1&ISO^NIIP
    raw = (CORPUS / "REF_I12" / "fhirconverter__REF-I12-01.hl7").read_text()
    normalised = MAPSET.normalise(raw, received_at=NOW)
    created = next(ev for ev in normalised.events if ev.type is Event.REFERRAL_CREATED)
    referral, _ = fold(None, RID, LoggedEvent(created.type, created.fields, NOW, NOW))
    assert referral is not None
    coverage = coverage_of(make_ctx(referral.data, sources={"order": raw}))
    (payor,) = coverage["payor"]
    assert payor["identifier"]["system"] == "urn:oid:2.16.840.1.113883.1.1"
    assert payor["identifier"]["value"] == "Org-12345"
    assert payor["identifier"]["type"]["coding"][0]["code"] == "NIIP"
    assert payor["display"] == "Blue Cross Blue Shield of Texas"


@pytest.mark.parametrize(
    ("namespace", "system"),
    [
        ("ACME", "urn:refloop:assigner:ACME"),
        ("St Mary", "urn:refloop:assigner:St%20Mary"),
        ("1.3.6.1.4.1.21367.13.20.1000", "urn:oid:1.3.6.1.4.1.21367.13.20.1000"),
        ("http://ehr.example.org/orders", "http://ehr.example.org/orders"),
        ("urn:oid:2.16.840.1.113883.19", "urn:oid:2.16.840.1.113883.19"),
        ("NPI", "http://hl7.org/fhir/sid/us-npi"),
        ("1.2.03", "urn:refloop:assigner:1.2.03"),  # a leading zero is not an OID
    ],
)
def test_assigning_authorities_become_systems(namespace: str, system: str) -> None:
    assert system_for(namespace) == system


def test_placer_system_option_overrides_the_assigner() -> None:
    ctx = make_ctx(RICH, options={"placer_system": "urn:oid:2.16.840.1.113883.19.5"})
    sr = only(bundle_of(render_referral_bundle(ctx).payload), "ServiceRequest")["resource"]
    assert carries(sr, "urn:oid:2.16.840.1.113883.19.5", "PO7")


def test_a_patient_number_without_assigner_never_keys_a_match() -> None:
    data = {"referral": {**RICH["referral"], "patient.identifier": {"value": "100007"}}}
    patient = only(bundle_of(render_referral_bundle(make_ctx(data)).payload), "Patient")
    system, value = match_of(patient["request"]["ifNoneExist"])
    assert system == "urn:ietf:rfc:3986"
    assert value == patient["fullUrl"]
    assert {"value": "100007"} in patient["resource"]["identifier"]


@pytest.mark.parametrize("render", [render_referral_bundle, render_status_update])
def test_missing_patient_identifier_is_a_render_error_without_values(render: Any) -> None:
    fields = {k: v for k, v in RICH["referral"].items() if k != "patient.identifier"}
    fields["patient.name"] = {"family": MARKER, "given": "X"}
    with pytest.raises(RenderError) as caught:
        render(make_ctx({"referral": fields}, event=Event.REFERRAL_UPDATED))
    assert "patient.identifier" in caught.value.reason
    assert MARKER not in caught.value.reason
    assert MARKER not in str(caught.value)


def test_validation_errors_name_the_element_never_the_value() -> None:
    fields = {**RICH["referral"], "patient.birth_date": f"{MARKER}-01-01"}
    with pytest.raises(RenderError) as caught:
        render_referral_bundle(make_ctx({"referral": fields}))
    assert "Patient.birthDate" in caught.value.reason
    assert MARKER not in caught.value.reason


@pytest.mark.parametrize(
    ("ident", "token"),
    [
        ({"system": "urn:refloop:referral", "value": "abc"}, "urn:refloop:referral|abc"),
        ({"system": "urn:x", "value": "A|B,C$D"}, "urn:x|A%5C%7CB%5C%2CC%5C%24D"),
        ({"system": "urn:x", "value": "two words"}, "urn:x|two%20words"),
        ({"value": "bare"}, "bare"),
    ],
)
def test_search_tokens_are_escaped(ident: dict[str, str], token: str) -> None:
    assert search_token(ident) == token


# -- fhir.status_update ----------------------------------------------------------------


def test_status_update_rewrites_the_task_by_conditional_update() -> None:
    ctx = make_ctx(
        RICH,
        state=State.CANCELLED,
        event=Event.REFERRAL_CANCELLED,
        fields={"status_reason": "Patient moved away"},
        before=State.SENT,
        after=State.CANCELLED,
    )
    rendered = render_status_update(ctx)
    assert rendered.payload == render_status_update(ctx).payload
    assert rendered.metadata == {"fhir_method": "POST", "fhir_url": ""}
    bundle = bundle_of(rendered.payload)
    entry = only(bundle, "Task")
    assert entry["request"] == {
        "method": "PUT",
        "url": f"Task?identifier=urn:refloop:referral|{RID}",
    }
    task = entry["resource"]
    assert carries(task, "urn:refloop:referral", RID)  # so the next PUT finds it
    assert (task["status"], task["businessStatus"]["coding"][0]["code"]) == ("cancelled", "6.0")
    assert task["statusReason"] == {"text": "Patient moved away"}
    assert task["lastModified"] == NOW.isoformat()
    # the EHR's order and patient are referenced by identifier
    assert task["focus"]["identifier"]["value"] == "PO7"
    assert task["for"] == {
        "type": "Patient",
        "identifier": {
            "system": "urn:refloop:assigner:ACME",
            "value": "100007",
            "type": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}
                ]
            },
        },
    }
    assert task["owner"]["identifier"] == {
        "system": "http://hl7.org/fhir/sid/us-npi",
        "value": "1234567893",
    }


@pytest.mark.parametrize(
    ("before", "after", "status"),
    [
        (State.COMPLETED, State.NOTE_RECEIVED, "completed"),
        (State.SCHEDULED, State.NOTE_RECEIVED, "completed"),
        (State.SENT, State.CANCELLED, "revoked"),
        (State.ACCEPTED, State.DECLINED, "revoked"),
        (None, State.CANCELLED, "revoked"),
        (State.NOTE_RECEIVED, State.CLOSED, None),  # already completed
        (State.NOTE_RECEIVED, State.NOTE_RECEIVED, None),  # an amendment
        (State.ACCEPTED, State.SCHEDULED, None),  # never invent "scheduled"
        (State.CREATED, State.SENT, None),
        (State.SCHEDULED, State.NO_SHOW, None),
    ],
)
def test_service_request_status_changes_only_on_real_transitions(
    before: State | None, after: State, status: str | None
) -> None:
    ctx = make_ctx(RICH, state=after, event=Event.REFERRAL_UPDATED, before=before, after=after)
    bundle = bundle_of(render_status_update(ctx).payload)
    patches = [e for e in bundle["entry"] if e["request"]["method"] == "PATCH"]
    if status is None:
        assert patches == []
        return
    (patch,) = patches
    assert patch["request"]["url"] == "ServiceRequest?identifier=urn:refloop:assigner:ACME|PO7"
    parts = {p["name"]: p for p in patch["resource"]["parameter"][0]["part"]}
    assert parts["type"]["valueCode"] == "replace"
    assert parts["path"]["valueString"] == "ServiceRequest.status"
    assert parts["value"]["valueCode"] == status

    off = make_ctx(
        RICH,
        state=after,
        event=Event.REFERRAL_UPDATED,
        before=before,
        after=after,
        options={"service_request_status": "off"},
    )
    kept = bundle_of(render_status_update(off).payload)
    assert [e for e in kept["entry"] if e["request"]["method"] == "PATCH"] == []


def test_the_loop_consult_note_is_written_back_with_its_text() -> None:
    ctx = loop_contexts()[-1]
    assert ctx.event.type is Event.CONSULT_NOTE_RECEIVED
    bundle = bundle_of(render_status_update(ctx).payload)
    entry = only(bundle, "DocumentReference")
    doc = entry["resource"]
    assert entry["request"]["method"] == "PUT"
    system, value = match_of(entry["request"]["url"])
    assert carries(doc, system, value)
    assert doc["status"] == "current"
    assert doc["docStatus"] == "final"
    assert doc["type"]["coding"][0] == {
        "code": "11488-4",
        "display": "Consult note",
        "system": "http://loinc.org",
    }
    assert doc["masterIdentifier"]["value"] == "CN-PO1"
    assert doc["context"]["related"][0]["identifier"]["value"] == "PO1"
    assert doc["subject"]["identifier"]["value"] == "100001"
    assert doc["date"] == "2026-12-02T10:55:00-06:00"
    (content,) = doc["content"]
    assert content["attachment"]["contentType"] == "text/plain; charset=utf-8"
    assert decoded(content["attachment"]) == b"Synthetic consult note text."

    task = only(bundle, "Task")["resource"]
    assert (task["status"], task["businessStatus"]["coding"][0]["code"]) == ("completed", "7.0")
    outputs = {o["type"].get("text"): o["valueReference"] for o in task["output"]}
    assert outputs["Consult note"] == {"reference": entry["fullUrl"]}
    # the booking from earlier in the loop stays on the Task (the PUT replaces it whole)
    assert outputs["Appointment"]["identifier"] == {
        "system": "urn:refloop:assigner:CLINIC",
        "value": "FA-PO1",
    }
    (patch,) = [e for e in bundle["entry"] if e["request"]["method"] == "PATCH"]
    assert patch["resource"]["parameter"][0]["part"][2]["valueCode"] == "completed"


def test_an_amended_note_updates_the_same_document_reference() -> None:
    original = loop_contexts()[-1]
    amended = loop_contexts("PO1", note_status="C")[-1]
    assert amended.event.type is Event.CONSULT_NOTE_AMENDED
    first = only(bundle_of(render_status_update(original).payload), "DocumentReference")
    second = only(bundle_of(render_status_update(amended).payload), "DocumentReference")
    assert second["resource"]["docStatus"] == "amended"
    assert second["request"]["url"] == first["request"]["url"]


def test_a_later_status_keeps_the_note_on_the_task() -> None:
    note = loop_contexts()[-1]
    closed = make_ctx(
        note.referral.data,
        state=State.CLOSED,
        event=Event.REFERRAL_CLOSED,
        before=State.NOTE_RECEIVED,
        after=State.CLOSED,
    )
    written = bundle_of(render_status_update(note).payload)
    doc_url = only(written, "DocumentReference")["request"]["url"]
    bundle = bundle_of(render_status_update(closed).payload)
    assert entries(bundle, "DocumentReference") == []
    task = only(bundle, "Task")["resource"]
    ref = next(o["valueReference"] for o in task["output"] if o["type"]["text"] == "Consult note")
    assert (ref["identifier"]["system"], ref["identifier"]["value"]) == match_of(doc_url)


def test_the_loop_booking_writes_an_appointment() -> None:
    ctx = next(c for c in loop_contexts() if c.event.type is Event.APPOINTMENT_BOOKED)
    bundle = bundle_of(render_status_update(ctx).payload)
    entry = only(bundle, "Appointment")
    assert entry["request"] == {
        "method": "PUT",
        "url": "Appointment?identifier=urn:refloop:assigner:CLINIC|FA-PO1",
    }
    appt = entry["resource"]
    assert appt["status"] == "booked"
    assert appt["start"] == "2026-12-01T14:00:00-06:00"
    assert appt["end"] == "2026-12-01T14:30:00-06:00"
    assert appt["basedOn"][0]["identifier"]["value"] == "PO1"
    assert appt["participant"][0]["actor"]["identifier"]["value"] == "100001"
    task = only(bundle, "Task")["resource"]
    assert (task["status"], task["businessStatus"]["coding"][0]["code"]) == ("in-progress", "5.1.1")
    assert {"type": {"text": "Appointment"}, "valueReference": {"reference": entry["fullUrl"]}} in (
        task["output"]
    )


@pytest.mark.parametrize(
    ("event", "status"),
    [
        (Event.APPOINTMENT_CANCELLED, "cancelled"),
        (Event.APPOINTMENT_NO_SHOW, "noshow"),
        (Event.APPOINTMENT_COMPLETED, "fulfilled"),
        (Event.APPOINTMENT_RESCHEDULED, "booked"),
    ],
)
def test_appointment_events_set_the_appointment_status(event: Event, status: str) -> None:
    appt = {
        "appointment_id": {"value": "A1", "namespace": "SCHED"},
        "start": "2026-12-01T14:00:00-06:00",
        "duration_minutes": 45,
        "location": "Clinic 3",
    }
    ctx = make_ctx({**RICH, "appointment": appt}, event=event, fields={"status_reason": "Ill"})
    found = only(bundle_of(render_status_update(ctx).payload), "Appointment")["resource"]
    assert found["status"] == status
    assert found["end"] == "2026-12-01T14:45:00-06:00"  # start + duration
    assert {"actor": {"type": "Location", "display": "Clinic 3"}, "status": "accepted"} in (
        found["participant"]
    )
    assert ("cancelationReason" in found) == (status == "cancelled")


def test_a_booked_appointment_without_a_start_is_a_render_error() -> None:
    appt = {"appointment_id": {"value": "A1", "namespace": "SCHED"}}
    ctx = make_ctx({**RICH, "appointment": appt}, event=Event.APPOINTMENT_BOOKED)
    with pytest.raises(RenderError, match=r"appointment\.start"):
        render_status_update(ctx)


def _note_ctx(trigger: str, event: Event = Event.CONSULT_NOTE_RECEIVED) -> PacketContext:
    note = {"document_id": {"value": "D1", "namespace": "EMR"}, "title": "Consult"}
    return make_ctx(
        {**RICH, "consult_note": note},
        state=State.NOTE_RECEIVED,
        event=event,
        before=State.COMPLETED,
        after=State.NOTE_RECEIVED,
        sources={"trigger": trigger},
    )


def _sample(name: str) -> str:
    return (CORPUS / name).read_bytes().decode("utf-8", "replace")


@pytest.mark.parametrize(
    ("sample", "content_type", "starts"),
    [
        # many TX lines under one OBR
        ("ORU_R01/linuxforhealth__ORU-multiline-short.hl7", "text/plain", b"[PII] Emergency"),
        # OBX-5 ED, IM/JPEG, Base64
        ("OMG_O19/fhirconverter__OMG-O19-01.hl7", "image/jpeg", b"This is a Base64 string"),
        # OBX-5 ED, inline CDA sent unescaped (text/xml, ASCII)
        ("ORU_R01/dcm4che__ORU_R01-CDA.hl7", "text/xml", b'<?xml version="1.0"'),
        # MDM: TX lines under the TXA
        ("MDM_T02/fhirconverter__MDM-T02-03.hl7", "text/plain", b"Toilet cylinder crackers"),
    ],
)
def test_note_content_from_corpus_messages(sample: str, content_type: str, starts: bytes) -> None:
    bundle = bundle_of(render_status_update(_note_ctx(_sample(sample))).payload)
    doc = only(bundle, "DocumentReference")["resource"]
    attachment = doc["content"][0]["attachment"]
    assert attachment["contentType"].split(";")[0] == content_type
    assert attachment["title"] == "Consult"
    assert decoded(attachment).startswith(starts)


def test_text_lines_keep_their_order_and_escapes_are_resolved() -> None:
    trigger = "\r".join(
        [
            "MSH|^~\\&|EMR|CARDIO|REFLOOP|HUB|20261202||ORU^R01^ORU_R01|N1|P|2.5.1",
            "PID|1||100007^^^ACME^MR||TESTPATIENT^BRAVO",
            "OBR|1|PO7^ACME|D1^EMR|11488-4^Consult note^LN|||||||||||||||||||||F",
            "OBX|1|FT|11488-4^Consult note^LN||Line one\\.br\\Line two||||||F",
            "OBX|2|TX|11488-4^Consult note^LN||BP 120\\S\\80 \\T\\ stable~Second rep||||||F",
        ]
    )
    doc = only(bundle_of(render_status_update(_note_ctx(trigger)).payload), "DocumentReference")
    text = decoded(doc["resource"]["content"][0]["attachment"]).decode("utf-8")
    assert text == "Line one\nLine two\nBP 120^80 & stable\nSecond rep"


def test_the_note_of_the_matching_report_is_chosen() -> None:
    trigger = "\r".join(
        [
            "MSH|^~\\&|EMR|CARDIO|REFLOOP|HUB|20261202||ORU^R01^ORU_R01|N2|P|2.5.1",
            "PID|1||100007^^^ACME^MR",
            "OBR|1|OTHER^ACME|D0^EMR|11488-4^Consult note^LN",
            "OBX|1|TX|11488-4^Consult note^LN||Not this one||||||F",
            "OBR|2|PO7^ACME|D1^EMR|11488-4^Consult note^LN",
            "OBX|1|TX|11488-4^Consult note^LN||This one||||||F",
        ]
    )
    doc = only(bundle_of(render_status_update(_note_ctx(trigger)).payload), "DocumentReference")
    assert decoded(doc["resource"]["content"][0]["attachment"]) == b"This one"


@pytest.mark.parametrize(
    "trigger",
    [
        None,  # no trigger message at all
        "not an HL7 message",
        # MDM-T02-01: an HD OBX and an ED OBX whose data is empty
        _sample("MDM_T02/fhirconverter__MDM-T02-01.hl7"),
    ],
    ids=["absent", "unreadable", "no-data"],
)
def test_a_note_without_content_is_a_render_error(trigger: str | None) -> None:
    ctx = _note_ctx(trigger or "")
    with pytest.raises(RenderError, match="consult note content") as caught:
        render_status_update(ctx)
    assert MARKER not in caught.value.reason


def test_a_pdf_cut_by_a_line_break_is_a_render_error() -> None:
    # The sample's base64 has a raw CR in it: the segment ends mid-document.
    with pytest.raises(RenderError, match=r"OBX-5\.5: the ED data is not valid base64"):
        render_status_update(_note_ctx(_sample("ORU_R01/dcm4che__ORU_R01-PDF.hl7")))


def test_bad_base64_is_a_render_error_naming_the_field() -> None:
    trigger = "\r".join(
        [
            "MSH|^~\\&|EMR|CARDIO|REFLOOP|HUB|20261202||ORU^R01^ORU_R01|N3|P|2.5.1",
            "PID|1||100007^^^ACME^MR",
            "OBR|1|PO7^ACME|D1^EMR|11488-4^Consult note^LN",
            f"OBX|1|ED|11488-4^Consult note^LN||^AP^PDF^Base64^{MARKER}!!||||||F",
        ]
    )
    with pytest.raises(RenderError) as caught:
        render_status_update(_note_ctx(trigger))
    assert "OBX-5" in caught.value.reason
    assert MARKER not in caught.value.reason


def test_an_amendment_with_a_new_document_id_says_what_it_replaces() -> None:
    ctx = _note_ctx(_sample("ORU_R01/dcm4che__ORU_R01-CDA.hl7"), Event.CONSULT_NOTE_AMENDED)
    note = {**ctx.referral.data["consult_note"], "parent_document_id": {"value": "D0"}}
    amended = make_ctx(
        {**ctx.referral.data, "consult_note": note},
        state=State.NOTE_RECEIVED,
        event=Event.CONSULT_NOTE_AMENDED,
        sources=ctx.sources,
    )
    doc = only(bundle_of(render_status_update(amended).payload), "DocumentReference")["resource"]
    assert doc["docStatus"] == "amended"
    assert doc["relatesTo"] == [
        {"code": "replaces", "target": {"type": "DocumentReference", "identifier": {"value": "D0"}}}
    ]
