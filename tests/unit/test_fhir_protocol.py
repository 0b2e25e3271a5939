"""FHIR inbound, the pure part: parsing, R4B validation issues, identity, Bundles; and the
credentials a config names."""

from __future__ import annotations

import json
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
    location,
    operation_outcome,
    parse_json,
    parse_resource,
    same_resource,
    validate,
)
from engine.services.fhir_intake import prepare
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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
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
