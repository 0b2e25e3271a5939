"""FHIR inbound, the pure part: parsing, R4B validation issues, identity, Bundles; and the
credentials a config names."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import ConfigError
from engine.edges.fhir_auth import FhirAuth, allowed, bearer_token, signature_hex
from engine.protocol.fhir import (
    MAX_ISSUES,
    WRITABLE,
    FhirJsonError,
    Issue,
    bundle_entries,
    dedup_key,
    fhir_conflict,
    generated_id,
    link_entries,
    location,
    operation_outcome,
    parse_json,
    parse_resource,
    same_resource,
    validate,
)
from engine.services.fhir_intake import prepare, prepare_bundle
from tests.helpers import SHARED, make_config

CORPUS = SHARED / "corpus" / "fhir"


def paths(issues: list[Issue]) -> list[str | None]:
    return [i.expression for i in issues]


# -- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "the request body is empty"),
        (b"  \n", "the request body is empty"),
        (b'{"a": 1,\n "b": SECRET}', "malformed JSON at line 2 column 7: Expecting value"),
        (b'{"a": "x" "b": 2}', "malformed JSON at line 1 column 11: Expecting ',' delimiter"),
        (b'{"a": 1} trailing', "malformed JSON at line 1 column 10: Extra data"),
        (b"\xef\xbb\xbf\xc3\x28", "the body is not UTF-8 (first bad byte at offset 0)"),
        (b'{"a": 1, "a": 2}', "a JSON object repeats a member name (FHIR JSON allows each once)"),
        (b'{"a": Infinity}', "NaN and Infinity are not JSON numbers"),
        (b"[" * 50_000 + b"]" * 50_000, "the JSON is nested too deeply"),
        (b'{"a": ' + b"9" * 5000 + b"}", "a number in the body is too long"),
    ],
)
def test_unusable_json_says_what_and_where_never_the_text(raw: bytes, expected: str) -> None:
    with pytest.raises(FhirJsonError) as caught:
        parse_json(raw)
    assert caught.value.issue.code == "structure"
    assert caught.value.issue.diagnostics == expected
    assert "SECRET" not in caught.value.issue.diagnostics


def test_a_bom_is_tolerated() -> None:
    assert parse_json(b'\xef\xbb\xbf{"resourceType": "Task"}') == {"resourceType": "Task"}


@pytest.mark.parametrize("raw", [b"[]", b'"Task"', b'{"id": "x"}', b'{"resourceType": 3}'])
def test_a_resource_is_an_object_with_a_resource_type(raw: bytes) -> None:
    with pytest.raises(FhirJsonError):
        parse_resource(raw)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_bytes_parse_or_raise_only_fhir_json_error(raw: bytes) -> None:
    issue = None
    try:
        parse_json(raw)
    except FhirJsonError as exc:
        issue = exc.issue
    assert issue is None or issue.severity == "error"


# -- validation ------------------------------------------------------------------------

VALID = [
    p
    for t in WRITABLE
    for p in sorted((CORPUS / t).glob("*.json"))
    if p.name != "nhs-bars__service_request_GET-success.json"
]


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
def test_the_corpus_resources_are_valid_r4b(path: Path) -> None:
    assert validate(json.loads(path.read_bytes())) == []


def test_an_invalid_corpus_resource_names_its_elements() -> None:
    raw = (CORPUS / "ServiceRequest" / "nhs-bars__service_request_GET-success.json").read_bytes()
    issues = validate(json.loads(raw))
    assert {(i.code, i.expression) for i in issues} == {
        ("value", "ServiceRequest.basedOn"),
        ("structure", "ServiceRequest.PatientInstruction"),
    }


def task(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Task", "status": "requested", "intent": "order", **extra}


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"resourceType": "Task", "intent": "order"}, [("required", "Task.status")]),
        (task(authoredOn="2026-13-45"), [("value", "Task.authoredOn")]),
        (task(note=[{"text": 5}]), [("value", "Task.note[0].text")]),
        (task(id="bad id!"), [("value", "Task.id")]),
        (task(id="x" * 65), [("value", "Task.id")]),
        (task(meta={"versionId": "v" * 65}), [("value", "Task.meta.versionId")]),
        (task(input=[{"type": {"text": "x"}}]), [("value", "Task.input[0]")]),
        (task(unknownThing=1), [("structure", "Task.unknownThing")]),
        (task(**{"not an element!": 1}), [("structure", "Task.(unknown member)")]),
        (
            task(contained=[{"resourceType": "NoSuchType"}]),
            [("invalid", "Task.contained[0].resourceType")],
        ),
        ({"resourceType": "NoSuchType"}, [("not-supported", "NoSuchType.resourceType")]),
    ],
)
def test_validation_issues_name_the_element_path(
    resource: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    assert [(i.code, i.expression) for i in validate(resource)] == expected


def test_a_choice_element_says_which_choice() -> None:
    [issue] = validate(task(input=[{"type": {"text": "x"}}]))
    assert issue.diagnostics == "one of value[x] must be present"
    [issue] = validate(task(input=[{"type": {"text": "x"}, "valueString": "a", "valueInteger": 1}]))
    assert issue.diagnostics == "only one of value[x] must be present"


def test_code_values_are_not_checked_the_mapping_reports_them() -> None:
    assert validate(task(status="bogus", priority="whenever")) == []


def test_issues_never_quote_what_was_sent() -> None:
    resource = task(
        authoredOn="TESTPATIENT ALPHA",
        description=["Jane Doe"],
        note=[{"text": {"nested": "555-0100"}}],
        executionPeriod={"start": "MRN 998877"},
    )
    resource["for"] = "Patient Bob Smith"
    outcome = json.dumps(operation_outcome(validate(resource)))
    assert len(validate(resource)) >= 5
    for leak in ("TESTPATIENT", "Jane", "555-0100", "998877", "Bob"):
        assert leak not in outcome


def test_bundle_paths_start_at_the_entry() -> None:
    issues = validate({"resourceType": "Task"}, base="Bundle.entry[3].resource")
    assert set(paths(issues)) == {
        "Bundle.entry[3].resource.status",
        "Bundle.entry[3].resource.intent",
    }


# st.deferred rather than st.recursive: the latter's "extend doesn't use its argument"
# check misfires on some draws, and warnings are errors in this suite.
json_values: st.SearchStrategy[Any] = st.deferred(
    lambda: (
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(max_size=8)
        | st.lists(json_values, max_size=3)
        | st.dictionaries(st.text(max_size=8), json_values, max_size=3)
    )
)
elements = st.sampled_from(
    ["id", "meta", "status", "intent", "note", "for", "input", "contained", "authoredOn", "code"]
)


@given(st.sampled_from(WRITABLE), st.dictionaries(elements, json_values, max_size=5))
@settings(max_examples=200, deadline=None)
def test_validation_never_raises_on_hostile_content(rtype: str, body: dict[str, Any]) -> None:
    for issue in validate({"resourceType": rtype, **body}):
        assert issue.expression is None or issue.expression.startswith(rtype)


def test_an_operation_outcome_lists_at_most_max_issues() -> None:
    issues = [Issue("error", "value", "x", f"Task.note[{n}]") for n in range(MAX_ISSUES + 5)]
    outcome = operation_outcome(issues)
    assert len(outcome["issue"]) == MAX_ISSUES + 1
    assert outcome["issue"][-1]["diagnostics"] == "5 more issues"


# -- identity --------------------------------------------------------------------------


def test_dedup_keys() -> None:
    key = dedup_key("ehr", "Task", "t1", "2", None)
    assert key == dedup_key("ehr", "Task", "t1", "2", "identifier=a|b")  # the version wins
    assert key != dedup_key("other", "Task", "t1", "2", None)
    assert key != dedup_key("ehr", "Task", "t1", "3", None)
    assert key != dedup_key("ehr", "ServiceRequest", "t1", "2", None)
    assert dedup_key("ehr", "Task", "t1", None, None) is None
    conditional = dedup_key("ehr", "Task", None, None, "identifier=a|b")
    assert conditional == dedup_key("ehr", "Task", "t9", None, " identifier=a|b ")
    assert conditional != dedup_key("ehr", "ServiceRequest", None, None, "identifier=a|b")


def test_generated_ids_and_locations_are_deterministic() -> None:
    one = generated_id("ehr", "Task", "ab" * 32)
    assert one == generated_id("ehr", "Task", "ab" * 32)
    assert one != generated_id("ehr2", "Task", "ab" * 32)
    assert location("Task", one, None) == f"Task/{one}"
    assert location("Task", "t1", "3") == "Task/t1/_history/3"


def test_prepare_names_the_row_as_the_writer_and_normaliser_expect() -> None:
    from datetime import UTC, datetime

    raw = b'{"resourceType":"Task","id":"t1","meta":{"versionId":"2"},"status":"requested"}'
    p = prepare(
        "ehr",
        json.loads(raw),
        raw,
        peer="10.1.2.3:5000",
        received_at=datetime(2026, 12, 1, tzinfo=UTC),
        headers={"X-Request-Id": "r-1"},
    )
    assert p.location == "Task/t1/_history/2"
    row = p.row
    assert row["message_type"] == "FHIR:Task"
    assert row["control_id"] == "Task/t1/_history/2"
    assert row["dedup_key"] == dedup_key("ehr", "Task", "t1", "2", None)
    assert json.loads(row["headers"]) == {"x-request-id": "r-1"}
    assert not p.conditional


def test_same_resource_ignores_serialisation_and_last_updated() -> None:
    a = b'{"resourceType":"Task","meta":{"versionId":"1"},"status":"requested"}'
    b = (
        b'{\n "status": "requested",\n "meta": {"lastUpdated": "2026-12-01T00:00:00Z", '
        b'"versionId": "1"},\n "resourceType": "Task"}'
    )
    assert same_resource(a, b)
    assert not same_resource(a, a.replace(b"requested", b"accepted"))


def test_fhir_conflict_decides_between_duplicate_and_conflict() -> None:
    raw = b'{"resourceType":"Task","id":"t1","meta":{"versionId":"1"},"status":"requested"}'
    row = {"raw": raw.replace(b"requested", b"accepted"), "control_id": "Task/t1/_history/1"}
    updates = fhir_conflict(row, raw, 7)
    assert updates is not None
    assert (updates["status"], updates["error_code"]) == ("rejected", 409)
    assert "message 7" in updates["error"]
    assert "accepted" not in updates["error"]
    assert fhir_conflict({**row, "raw": raw.replace(b":", b": ")}, raw, 7) is None
    # A conditional create that matches again is a duplicate whatever it carries.
    conditional = {"raw": b'{"resourceType":"Task","status":"x"}', "control_id": "Task/u"}
    assert fhir_conflict(conditional, b'{"resourceType":"Task","status":"y"}', 7) is None


# -- Bundles ---------------------------------------------------------------------------


def entry(resource: dict[str, Any], method: str = "POST", url: str | None = None) -> dict[str, Any]:
    return {
        "resource": resource,
        "request": {"method": method, "url": url or resource["resourceType"]},
    }


def bundle(kind: str, *entries: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def test_a_bundle_must_be_a_transaction_or_a_batch() -> None:
    for kind in ("history", "message", "collection", None):
        check = bundle_entries(bundle(kind) if kind else {"resourceType": "Bundle"})
        assert (check.status, paths(list(check.issues))) == (422, ["Bundle.type"])


@pytest.mark.parametrize(
    ("raw_entry", "status", "where"),
    [
        (entry(task()), 201, None),
        (entry(task(id="t1"), "PUT", "Task/t1"), 201, None),
        (entry(task(), "PUT", "Task?identifier=a|b"), 201, None),
        (entry(task(id="t1"), "PUT", "Task/t2"), 400, "Bundle.entry[0].resource.id"),
        (entry(task(), "PUT", "Task"), 400, "Bundle.entry[0].request.url"),
        (entry(task(), "POST", "ServiceRequest"), 400, "Bundle.entry[0].request.url"),
        (entry(task(), "POST", "Task/t1"), 400, "Bundle.entry[0].request.url"),
        (entry(task(), "DELETE", "Task/t1"), 400, "Bundle.entry[0].request.method"),
        ({"resource": task()}, 400, "Bundle.entry[0].request"),
        ({"request": {"method": "POST", "url": "Task"}}, 400, "Bundle.entry[0].resource"),
        ({"request": {"url": "Task"}, "resource": task()}, 400, "Bundle.entry[0].request.method"),
        ("not an entry", 400, "Bundle.entry[0]"),
        (
            entry({"resourceType": "Task", "intent": "order"}),
            422,
            "Bundle.entry[0].resource.status",
        ),
    ],
)
def test_each_entry_is_checked_on_its_own(raw_entry: Any, status: int, where: str | None) -> None:
    check = bundle_entries(bundle("batch", raw_entry))
    assert check.issues == ()
    [one] = check.entries
    assert one.status == status
    assert (paths(list(one.issues))[:1] or [None]) == [where]


def test_entries_keep_their_if_none_exist() -> None:
    raw = entry(task())
    raw["request"]["ifNoneExist"] = "identifier=a|b"
    [one] = bundle_entries(bundle("transaction", raw)).entries
    assert (one.ok, one.method, one.if_none_exist) == (True, "POST", "identifier=a|b")


# -- Bundle-local references -----------------------------------------------------------

PAT_URL = "urn:uuid:6c3f2a9e-0d4b-4f8e-9a31-5b7c2d1e0f42"
SR_URL = "urn:uuid:1e2d3c4b-5a69-4788-97a6-b5c4d3e2f1a0"
MRN = {"type": {"coding": [{"code": "MR"}]}, "system": "urn:oid:1.2.9", "value": "MRN-7"}
SSN = {"system": "urn:oid:2.16.840.1.113883.4.1", "value": "999-99-9999"}
PATIENT = {"resourceType": "Patient", "identifier": [SSN, MRN]}
ORDER_ID = {"system": "urn:oid:1.2.3", "value": "ORD-1", "assigner": {"reference": PAT_URL}}
ORDER = {
    "resourceType": "ServiceRequest",
    "status": "active",
    "intent": "order",
    "identifier": [{"system": "urn:oid:1.2.3"}, ORDER_ID],
    "subject": {"reference": PAT_URL},
}


def linked_task(
    task_fields: dict[str, Any],
    *,
    patient: dict[str, Any] = PATIENT,
    order: dict[str, Any] = ORDER,
    targets: set[int] | None = None,
) -> dict[str, Any]:
    """The Task of a Bundle [Patient, ServiceRequest, Task] after :func:`link_entries`."""
    raw = bundle(
        "transaction",
        {**entry(patient), "fullUrl": PAT_URL},
        {**entry(order), "fullUrl": SR_URL},
        {**entry(task(**task_fields)), "fullUrl": "urn:uuid:00000000-0000-4000-8000-00000000000c"},
    )
    out = link_entries(raw, targets=targets)[2]
    assert out is not None
    return out


AS_PATIENT = {"reference": PAT_URL, "type": "Patient", "identifier": MRN}
ORDER_LINK = {"system": "urn:oid:1.2.3", "value": "ORD-1"}  # assigner is a reference: left


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # No id on the target: the urn stays, the reference becomes logical too.
        ({"for": {"reference": PAT_URL}}, {"for": AS_PATIENT}),
        (
            {"for": {"reference": f" {PAT_URL} "}},
            {"for": {**AS_PATIENT, "reference": f" {PAT_URL} "}},
        ),
        (
            {"focus": {"reference": SR_URL, "display": "the order"}},
            {
                "focus": {
                    "reference": SR_URL,
                    "display": "the order",
                    "type": "ServiceRequest",
                    "identifier": ORDER_LINK,
                }
            },
        ),
        # Nested: in lists, backbone elements and extensions.
        (
            {"basedOn": [{"reference": "ServiceRequest/x"}, {"reference": SR_URL}]},
            {
                "basedOn": [
                    {"reference": "ServiceRequest/x"},
                    {"reference": SR_URL, "type": "ServiceRequest", "identifier": ORDER_LINK},
                ]
            },
        ),
        (
            {"output": [{"type": {"text": "t"}, "valueReference": {"reference": PAT_URL}}]},
            {"output": [{"type": {"text": "t"}, "valueReference": AS_PATIENT}]},
        ),
        (
            {"extension": [{"url": "http://x/e", "valueReference": {"reference": PAT_URL}}]},
            {"extension": [{"url": "http://x/e", "valueReference": AS_PATIENT}]},
        ),
        # What the sender wrote in the Reference stays.
        (
            {"for": {"reference": PAT_URL, "type": "Group", "identifier": SSN}},
            {"for": {"reference": PAT_URL, "type": "Group", "identifier": SSN}},
        ),
        # Not another entry: left as sent.
        ({"for": {"reference": "urn:uuid:not-in-this-bundle"}}, None),
        ({"for": {"reference": "Patient/p-1"}}, None),
        ({"for": {"reference": "#p1"}}, None),
        ({"for": {"identifier": MRN}}, None),
        ({"note": [{"text": PAT_URL}]}, None),
    ],
)
def test_references_to_other_entries_become_self_standing(
    fields: dict[str, Any], expected: dict[str, Any] | None
) -> None:
    got = linked_task(fields)
    assert got == task(**(fields if expected is None else expected))
    assert validate(got) == []


def test_a_target_with_an_id_is_referenced_as_type_and_id() -> None:
    got = linked_task({"for": {"reference": PAT_URL}}, patient={**PATIENT, "id": "pat-7"})
    assert got["for"] == {"reference": "Patient/pat-7", "type": "Patient", "identifier": MRN}


@pytest.mark.parametrize(
    ("identifiers", "expected"),
    [
        ([SSN, MRN], MRN),  # a Patient's MR first
        ([SSN], SSN),  # else its first
        ([{"system": "urn:oid:1"}, SSN], SSN),  # an identifier without a value names nothing
        ([], None),
        (None, None),
    ],
)
def test_the_identifier_a_reference_carries(
    identifiers: list[dict[str, Any]] | None, expected: dict[str, Any] | None
) -> None:
    patient: dict[str, Any] = {"resourceType": "Patient"}
    if identifiers is not None:
        patient["identifier"] = identifiers
    got = linked_task({"for": {"reference": PAT_URL}}, patient=patient)
    want = {"reference": PAT_URL, "type": "Patient"}
    assert got["for"] == (want if expected is None else {**want, "identifier": expected})


def test_contained_and_nested_resources_keep_their_references() -> None:
    contained = {"resourceType": "Patient", "id": "c1", "link": [{"other": {"reference": PAT_URL}}]}
    got = linked_task({"contained": [contained], "for": {"reference": "#c1"}})
    assert got["contained"] == [contained]
    assert got["for"] == {"reference": "#c1"}


def test_only_the_given_entries_are_targets() -> None:
    got = linked_task({"for": {"reference": PAT_URL}, "focus": {"reference": SR_URL}}, targets={1})
    assert got["for"] == {"reference": PAT_URL}
    assert got["focus"]["type"] == "ServiceRequest"


def test_relative_references_resolve_on_a_restful_full_url() -> None:
    base = "http://example.org/fhir"
    patient = {**PATIENT, "id": "123"}
    raw = bundle(
        "transaction",
        {**entry(patient, "PUT", "Patient/123"), "fullUrl": f"{base}/Patient/123"},
        {
            **entry(task(id="t1", **{"for": {"reference": "Patient/123"}})),
            "fullUrl": f"{base}/Task/t1",
        },
        {**entry(task(**{"for": {"reference": f"{base}/Patient/123"}})), "fullUrl": "urn:uuid:a"},
        {**entry(task(**{"for": {"reference": "Patient/123"}})), "fullUrl": "urn:uuid:b"},
    )
    linked = link_entries(raw)
    want = {"reference": "Patient/123", "type": "Patient", "identifier": MRN}
    assert [r["for"] for r in linked[1:] if r] == [want, want, {"reference": "Patient/123"}]


def test_a_full_url_two_entries_share_names_neither() -> None:
    raw = bundle(
        "batch",
        {**entry(PATIENT), "fullUrl": PAT_URL},
        {**entry({"resourceType": "Group", "type": "person", "actual": True}), "fullUrl": PAT_URL},
        entry(task(**{"for": {"reference": PAT_URL}})),
    )
    linked = link_entries(raw)[2]
    assert linked is not None
    assert linked["for"] == {"reference": PAT_URL}


def test_the_bundle_is_not_modified_and_entries_without_a_resource_are_none() -> None:
    raw = bundle(
        "transaction",
        {**entry(PATIENT), "fullUrl": PAT_URL},
        "not an entry",
        {"request": {"method": "POST", "url": "Task"}},
        {"resource": {"no": "resourceType"}, "fullUrl": SR_URL},
        {**entry(task(**{"for": {"reference": PAT_URL}})), "fullUrl": 7},
    )
    before = copy.deepcopy(raw)
    linked = link_entries(raw)
    assert raw == before
    assert [r is None for r in linked] == [False, True, True, True, False]
    assert linked[4] is not None
    assert linked[4]["for"] == AS_PATIENT
    assert link_entries({"resourceType": "Bundle", "entry": {"not": "a list"}}) == []
    assert link_entries({"resourceType": "Bundle"}) == []


def test_the_corpus_transaction_stays_valid_entry_by_entry() -> None:
    raw = json.loads((CORPUS / "Bundle" / "fhirR4spec__bundle-transaction.json").read_bytes())
    check = bundle_entries(raw)
    linked = link_entries(raw, targets={e.index for e in check.entries if e.ok})
    for e in check.entries:
        resource = linked[e.index]
        if e.ok and resource is not None:
            assert validate(resource) == [], e.index


link_json: st.SearchStrategy[Any] = st.deferred(
    lambda: (
        st.none()
        | st.booleans()
        | st.integers()
        | st.sampled_from([PAT_URL, SR_URL, "Patient/1"])
        | st.lists(link_json, max_size=3)
        | st.dictionaries(
            st.sampled_from(["reference", "resourceType", "fullUrl", "resource", "id", "x"]),
            link_json,
            max_size=3,
        )
    )
)


@given(st.lists(link_json, max_size=4))
@settings(max_examples=300, deadline=None)
def test_linking_any_json_never_raises(entries: list[Any]) -> None:
    raw = {"resourceType": "Bundle", "type": "batch", "entry": entries}
    before = copy.deepcopy(raw)
    assert len(link_entries(raw)) == len(entries)
    assert raw == before


def test_a_split_bundle_keeps_the_bundle_as_sent_and_links_its_entries() -> None:
    raw = bundle(
        "transaction",
        {**entry(PATIENT), "fullUrl": PAT_URL},
        {**entry(task(**{"for": {"reference": PAT_URL}})), "fullUrl": SR_URL},
        entry({"resourceType": "Task", "intent": "order"}),  # no status: not stored
    )
    body = json.dumps(raw, indent=2).encode()
    at = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    check = bundle_entries(raw)
    rows = prepare_bundle("ehr", raw, body, check, peer="127.0.0.1:1", received_at=at)
    record = rows.record.row
    assert (record["message_type"], record["raw"], record["status"]) == (
        "FHIR:Bundle",
        body,
        "received",
    )
    assert sorted(rows.entries) == [0, 1]
    stored = json.loads(rows.entries[1].row["raw"])
    assert stored["for"] == AS_PATIENT
    headers = json.loads(rows.entries[1].row["headers"])
    assert headers == {"bundle-entry": "transaction 1", "bundle-sha256": record["payload_sha256"]}
    # The record's key is the source and the bytes, whatever the Bundle's id and version.
    versioned = {**raw, "id": "b1", "meta": {"versionId": "1"}}
    other = json.dumps(versioned).encode()
    again = prepare_bundle("ehr", versioned, other, check, peer="p", received_at=at).record
    same = prepare_bundle("ehr", raw, body, check, peer="p", received_at=at).record
    elsewhere = prepare_bundle("lab", raw, body, check, peer="p", received_at=at).record
    assert same.row["dedup_key"] == record["dedup_key"]
    assert len({record["dedup_key"], again.row["dedup_key"], elsewhere.row["dedup_key"]}) == 3
    assert not again.conditional


# -- credentials and config --------------------------------------------------------------


def test_bearer_and_signature_headers_are_read_case_insensitively() -> None:
    assert bearer_token({"Authorization": "bearer  abc "}) == "abc"
    assert bearer_token({"authorization": "Basic abc"}) is None
    assert bearer_token({"authorization": "Bearer"}) is None
    assert signature_hex({"X-Hub-Signature": "sha256=ABCD"}) == "abcd"
    assert signature_hex({"x-hub-signature": "sha1=abcd"}) is None


def fhir_config(tmp_path: Path, **source: Any) -> Any:
    table = {"name": "ehr", "token": {"file": "ehr.token"}, **source}
    return make_config(
        "sqlite:///:memory:", source=tmp_path / "engine.toml", fhir={"sources": [table]}
    )


def test_cidrs_hold_v4_and_v4_mapped_v6_addresses(tmp_path: Path) -> None:
    source = fhir_config(tmp_path, allowed_cidrs=["10.0.0.0/8"]).fhir.sources[0]
    assert allowed(source, "10.2.3.4")
    assert allowed(source, "::ffff:10.2.3.4")
    assert not allowed(source, "127.0.0.1")
    assert not allowed(source, "not-an-address")


def test_an_unreadable_secret_file_is_a_config_problem_and_stops_the_start(tmp_path: Path) -> None:
    config = fhir_config(tmp_path)
    (tmp_path / "ehr.token").write_text("t0ken\n")
    assert config.file_problems() == []
    assert FhirAuth.from_config(config).by_bearer({"authorization": "Bearer t0ken"}) is not None
    (tmp_path / "ehr.token").unlink()
    (tmp_path / "ehr.token").mkdir()  # there, but no file to read
    [problem] = config.file_problems()
    assert "fhir.sources[0].token.file" in problem
    with pytest.raises(ConfigError, match="cannot read secret file"):
        FhirAuth.from_config(config)


def test_two_sources_with_one_token_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFLOOP_TEST_SHARED_TOKEN", "same")
    ref = {"env": "REFLOOP_TEST_SHARED_TOKEN"}
    config = make_config(
        "sqlite:///:memory:",
        fhir={"sources": [{"name": "a", "token": ref}, {"name": "b", "token": ref}]},
    )
    with pytest.raises(ConfigError, match="same token"):
        FhirAuth.from_config(config)
