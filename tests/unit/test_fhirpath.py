"""The FHIRPath subset: what it refuses (and where, to the character), what it selects
(absent and present kept apart, where/first/exists, resolve() is T), and the FHIR readers
that turn what it selects into canonical values."""

from __future__ import annotations

from datetime import UTC
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from engine.mapping.fhir_readers import namespace, parse_datetime, read_fhir
from engine.mapping.fhirpath import (
    Equals,
    FhirPathError,
    Where,
    compile_fhirpath,
    parse_fhirpath,
    parse_reference,
    reference_type,
    select,
)
from engine.mapping.plan import Reader
from engine.mapping.readers import Assumed, BadValue

# ---- syntax -------------------------------------------------------------------------

SYNTAX_ERRORS = [
    # (path, column, message fragment)
    ("identifier[0]", 11, "no indexers in the subset (FHIRPath counts from 0)"),
    ("identifier.where(system = 'x')[1]", 31, "no indexers"),
    ("status or intent", 8, "operator 'or' is not in the subset"),
    ("status = 'active'", 8, "unexpected '='"),
    ("code.coding.count()", 13, "count() is not in refloop's FHIRPath subset"),
    ("focus.resolve()", 7, "resolve() only goes in `where(resolve() is Type)`"),
    ("identifier.where(value = 1)", 26, "expected a quoted text"),
    ("identifier.where(value = 'x'", 29, "expected ')' or 'and', found the end"),
    ("identifier.where(value = 'x' or system = 'y')", 30, "expected ')' or 'and'"),
    ("first(1)", 7, "first() takes no arguments"),
    ("basedOn.where(resolve() is 'ServiceRequest')", 28, "expected a resource type"),
    ("status.", 8, "expected an element name, found the end"),
    (".status", 1, "expected an element name"),
    ("", 1, "an empty path"),
    # SQL-style doubled quotes are two texts, not an escape
    ("identifier.where(value = 'it''s')", 30, "expected ')' or 'and', found \"'s'\""),
]


@pytest.mark.parametrize(("text", "column", "fragment"), SYNTAX_ERRORS)
def test_syntax_errors_point_at_the_character(text: str, column: int, fragment: str) -> None:
    with pytest.raises(FhirPathError) as caught:
        parse_fhirpath(text)
    assert caught.value.column == column
    assert fragment in caught.value.reason


def test_quoted_text_keeps_its_escapes() -> None:
    steps = parse_fhirpath(r"identifier.where(value = 'it\'s \\ ok')")
    where = steps[1]
    assert isinstance(where, Where)
    test = where.tests[0]
    assert isinstance(test, Equals)
    assert test.literal == "it's \\ ok"


# ---- type checking against the R4 models ----------------------------------------------

TYPE_ERRORS = [
    # (resource type, path, column, message fragment)
    (
        "ServiceRequest",
        "stauts",
        1,
        "ServiceRequest has no element 'stauts' (did you mean 'status'?)",
    ),
    (
        "ServiceRequest",
        "occurrence",
        1,
        "occurrence[x] is a choice: name its type, e.g. occurrenceDateTime",
    ),
    ("Task", "status.code", 8, "Task.status is a code, a primitive: it has no element 'code'"),
    ("Task", "status.where(x = 'y')", 8, "where() filters elements that have members"),
    ("Task", "focus.where(resolve() is Apointment)", 13, "(did you mean 'Appointment'?)"),
    (
        "ServiceRequest",
        "basedOn.where(resolve() is Patient)",
        15,
        "ServiceRequest.basedOn cannot point at Patient",
    ),
    ("Task", "identifier.where(resolve() is Patient)", 18, "resolve() reads a Reference"),
    ("Task", "identifier.where(type = 'PLAC')", 18, "= compares a primitive value"),
    ("Task", "identifier.where(use = 'oficial')", 18, "'oficial' is not a code of Identifier.use"),
    ("Task", "identifier.where(system)", 18, "a where() test is `path = 'text'`"),
    ("Task", "contained.id", 11, "holds whole resources"),
    ("Task", "focus.exists().reference", 16, "exists() ends a path"),
    ("Appointment", "participant.actor.where(resolve() is Banana)", 25, "not a FHIR resource type"),
]


@pytest.mark.parametrize(("kind", "text", "column", "fragment"), TYPE_ERRORS)
def test_type_errors_point_at_the_step(kind: str, text: str, column: int, fragment: str) -> None:
    with pytest.raises(FhirPathError) as caught:
        compile_fhirpath(text, kind)
    assert caught.value.column == column
    assert fragment in caught.value.reason


CHECKED = [
    # (resource type, path, many, FHIR type)
    ("ServiceRequest", "status", False, "code"),
    ("ServiceRequest", "ServiceRequest.status", False, "code"),
    ("ServiceRequest", "identifier", True, "Identifier"),
    ("ServiceRequest", "identifier.value", True, "string"),
    ("ServiceRequest", "identifier.first().value", False, "string"),
    ("ServiceRequest", "identifier.where(type.coding.code = 'PLAC').first()", False, "Identifier"),
    ("ServiceRequest", "identifier.where(type.coding.code = 'PLAC')", True, "Identifier"),
    ("ServiceRequest", "subject.identifier.value", False, "string"),
    ("ServiceRequest", "code.coding.code.first()", False, "code"),
    ("ServiceRequest", "occurrencePeriod.end", False, "dateTime"),
    ("ServiceRequest", "identifier.exists()", False, "boolean"),
    ("ServiceRequest", "doNotPerform", False, "boolean"),
    ("Task", "for", False, "Reference"),
    ("Task", "focus.where(resolve() is ServiceRequest)", False, "Reference"),
    ("Task", "output.valueReference.where(resolve() is Appointment).first()", False, "Reference"),
    ("Task", "restriction.repetitions", False, "positiveInt"),
    ("DocumentReference", "context.related.where(resolve() is ServiceRequest)", True, "Reference"),
    ("Appointment", "minutesDuration", False, "positiveInt"),
    ("Appointment", "start", False, "instant"),
]


@pytest.mark.parametrize(("kind", "text", "many", "ftype"), CHECKED)
def test_cardinality_and_type_come_from_the_models(
    kind: str, text: str, many: bool, ftype: str
) -> None:
    path = compile_fhirpath(text, kind)
    assert (path.many, path.type) == (many, ftype)


def test_the_resource_id_and_the_head_element_are_known() -> None:
    assert compile_fhirpath("id", "Task").resource_id
    assert not compile_fhirpath("meta.id", "Task").resource_id
    assert compile_fhirpath("Task.for.identifier", "Task").head == "for"


def test_required_binding_codes_travel_with_the_path() -> None:
    status = compile_fhirpath("status", "ServiceRequest")
    assert "active" in status.codes
    assert "revoked" in status.codes


# ---- evaluation -----------------------------------------------------------------------

TASK: dict[str, Any] = {
    "resourceType": "Task",
    "id": "t-1",
    "status": "accepted",
    "identifier": [
        {"type": {"coding": [{"code": "PLAC"}]}, "system": "urn:oid:1.2.3", "value": "P-1"},
        {"type": {"coding": [{"code": "FILL"}, {"code": "XX"}]}, "value": "F-1"},
        {"value": "U-1"},
    ],
    "focus": {"reference": "ServiceRequest/sr-1"},
    "basedOn": [
        {"reference": "CarePlan/cp-1"},
        {"reference": "https://ehr.example.org/fhir/ServiceRequest/sr-2/_history/4"},
        {"type": "ServiceRequest", "identifier": {"value": "L-1"}},
    ],
    "note": [{"text": "one"}, None, {"text": "two"}],
    "description": None,
}


def items(text: str, resource: dict[str, Any] = TASK, kind: str = "Task") -> list[Any]:
    got, _ = select(compile_fhirpath(text, kind), resource)
    return got


SELECTED = [
    ("status", ["accepted"]),
    ("owner", []),  # absent: an empty selection
    ("identifier.value", ["P-1", "F-1", "U-1"]),
    ("identifier.first().value", ["P-1"]),
    ("identifier.where(type.coding.code = 'PLAC').value", ["P-1"]),
    # FHIRPath =: exactly one item equal - the FILL type has two codings
    ("identifier.where(type.coding.code = 'FILL').value", []),
    ("identifier.where(type.coding.where(code = 'FILL').exists()).value", ["F-1"]),
    ("identifier.where(type.exists()).value", ["P-1", "F-1"]),
    ("identifier.where(type.coding.code = 'PLAC' and system = 'urn:oid:1.2.3').value", ["P-1"]),
    ("identifier.where(type.coding.code = 'PLAC' and system = 'x').value", []),
    ("identifier.exists()", [True]),
    ("owner.exists()", [False]),
    ("focus.where(resolve() is ServiceRequest).reference", ["ServiceRequest/sr-1"]),
    ("focus.where(resolve() is Appointment)", []),
    # relative, absolute with history, and a logical reference typed by Reference.type
    ("basedOn.where(resolve() is ServiceRequest).identifier.value", ["L-1"]),
    ("note.text", ["one", "two"]),
]


@pytest.mark.parametrize(("text", "want"), SELECTED)
def test_selections(text: str, want: list[Any]) -> None:
    assert items(text) == want


def test_where_keeps_every_matching_reference_in_order() -> None:
    got = items("basedOn.where(resolve() is ServiceRequest)")
    assert [g.get("reference") for g in got] == [
        "https://ehr.example.org/fhir/ServiceRequest/sr-2/_history/4",
        None,
    ]


def test_json_null_is_absent_and_flagged() -> None:
    path = compile_fhirpath("description", "Task")
    assert select(path, TASK) == ([], True)
    notes = compile_fhirpath("note.text", "Task")
    assert select(notes, TASK) == (["one", "two"], True)
    assert select(compile_fhirpath("status", "Task"), TASK) == (["accepted"], False)


def test_a_single_object_where_a_list_belongs_is_read_as_one_item() -> None:
    # NHS BaRS sends ServiceRequest.basedOn as an object (it is 0..*).
    sr = {"resourceType": "ServiceRequest", "basedOn": {"reference": "ServiceRequest/x"}}
    assert items("basedOn.reference", sr, "ServiceRequest") == ["ServiceRequest/x"]


def test_non_objects_have_no_members() -> None:
    odd = {"resourceType": "Task", "focus": "ServiceRequest/1", "identifier": ["P-1"]}
    assert items("focus.reference", odd) == []
    assert items("identifier.value", odd) == []


REFERENCES = [
    ("ServiceRequest/123", ("ServiceRequest", "123")),
    ("ServiceRequest/a.b-c/_history/2", ("ServiceRequest", "a.b-c")),
    ("https://fhir.example.org/r4/Patient/77662", ("Patient", "77662")),
    ("http://x/fhir/Patient/1/_history/9", ("Patient", "1")),
    ("#contained-1", None),
    ("urn:uuid:9f748662-afde-540e-a6d5-8cd6ae63cd56", None),
    ("urn:oid:1.2.3", None),
    ("d5ffd0cd-ec7e-48a1-84f1-91f4c0eb8fc5", None),  # untyped: NHS BaRS performer
    ("serviceRequest/1", None),
    ("ServiceRequest/", None),
]


@pytest.mark.parametrize(("text", "want"), REFERENCES)
def test_literal_references(text: str, want: tuple[str, str] | None) -> None:
    assert parse_reference(text) == want


def test_reference_type_falls_back_to_the_type_element() -> None:
    assert reference_type({"reference": "Task/1", "type": "Patient"}) == "Task"
    assert reference_type({"reference": "urn:uuid:1", "type": "Patient"}) == "Patient"
    assert reference_type({"type": "http://hl7.org/fhir/StructureDefinition/Patient"}) == "Patient"
    assert reference_type({"display": "Dr Dave"}) is None


# ---- readers --------------------------------------------------------------------------

CHICAGO = ZoneInfo("America/Chicago")


def read(reader: Reader, value: Any, text: str, kind: str = "Task") -> Any:
    return read_fhir(reader, value, compile_fhirpath(text, kind), kind, CHICAGO, Assumed())


READS = [
    # (reader, value, path the value came from, want)
    (
        Reader.IDENTIFIER,
        {"system": "urn:oid:1.2.3", "value": " P-1 ", "type": {"coding": [{"code": "PLAC"}]}},
        "identifier.first()",
        {"value": "P-1", "namespace": "1.2.3", "type": "PLAC"},
    ),
    (Reader.IDENTIFIER, {"value": "U-1"}, "identifier.first()", {"value": "U-1"}),
    (Reader.IDENTIFIER, {"system": "urn:oid:1.2.3"}, "identifier.first()", None),
    (
        Reader.IDENTIFIER,
        {"system": "urn:refloop:assigner:ACME", "value": "PO1"},
        "identifier.first()",
        {"value": "PO1", "namespace": "ACME"},
    ),
    (
        Reader.IDENTIFIER,
        {"reference": "ServiceRequest/123", "identifier": {"value": "ignored"}},
        "focus",
        {"value": "123", "namespace": "ServiceRequest"},
    ),
    (
        Reader.IDENTIFIER,
        {"reference": "urn:uuid:1", "identifier": {"system": "http://x", "value": "L-1"}},
        "focus",
        {"value": "L-1", "namespace": "http://x"},
    ),
    (Reader.IDENTIFIER, {"reference": "#p1"}, "focus", None),
    (Reader.IDENTIFIER, {"display": "Dr Dave"}, "focus", None),
    (Reader.IDENTIFIER, "t-1", "id", {"value": "t-1", "namespace": "Task"}),
    (Reader.IDENTIFIER, "G-1", "groupIdentifier.value", {"value": "G-1"}),
    (
        Reader.CODING,
        {"coding": [{"system": "s", "code": "c", "display": "d"}, {"code": "x"}], "text": "t"},
        "businessStatus",
        {"code": "c", "display": "d", "system": "s"},
    ),
    (
        Reader.CODING,
        {"coding": [{"code": "c"}], "text": "t"},
        "businessStatus",
        {"code": "c", "display": "t"},
    ),
    (
        Reader.CODING,
        {"text": "waiting for patient"},
        "businessStatus",
        {"display": "waiting for patient"},
    ),
    (Reader.CODING, {}, "businessStatus", None),
    (
        Reader.CODING,
        {"code": "c", "system": "s"},
        "businessStatus.coding.first()",
        {"code": "c", "system": "s"},
    ),
    (Reader.CODING, "accepted", "status", {"code": "accepted"}),
    (Reader.STRING, "accepted", "status", "accepted"),
    (Reader.STRING, True, "restriction.repetitions", "true"),
    (Reader.INT, 3, "restriction.repetitions", 3),
    (Reader.INT, "4", "restriction.repetitions", 4),
    (Reader.DECIMAL, 2, "restriction.repetitions", "2"),
]


@pytest.mark.parametrize(("reader", "value", "text", "want"), READS)
def test_readers(reader: Reader, value: Any, text: str, want: Any) -> None:
    assert read(reader, value, text) == want


def test_person_names() -> None:
    path = compile_fhirpath("name.first()", "Patient")
    name = {"family": "Chalmers", "given": ["Peter", "James", "Q"], "text": "ignored"}
    got = read_fhir(Reader.PERSON_NAME, name, path, "Patient", UTC, Assumed())
    assert got == {"family": "Chalmers", "given": "Peter", "middle": "James Q"}
    assert read_fhir(Reader.PERSON_NAME, {"text": "x"}, path, "Patient", UTC, Assumed()) is None


DATETIMES = [
    # (text, want for as: datetime in America/Chicago, zone assumed, want for as: date)
    ("2025-03-04T10:12:00-06:00", "2025-03-04T10:12:00-06:00", False, "2025-03-04"),
    ("2025-03-04T16:12:00Z", "2025-03-04T16:12:00+00:00", False, "2025-03-04"),
    ("2025-02-05T08:25:13.136693+00:00", "2025-02-05T08:25:13.136693+00:00", False, "2025-02-05"),
    ("2025-02-05T08:25:13.1234567+00:00", "2025-02-05T08:25:13.123456+00:00", False, "2025-02-05"),
    ("2025-07-01", "2025-07-01T00:00:00-05:00", True, "2025-07-01"),  # summer time
    ("2025-01", "2025-01-01T00:00:00-06:00", True, "2025-01-01"),
    ("2025", "2025-01-01T00:00:00-06:00", True, "2025-01-01"),
    ("2025-03-04T10:12:00", "2025-03-04T10:12:00-06:00", True, "2025-03-04"),  # invalid FHIR
    ("2025-03-04T10:12+01:00", "2025-03-04T10:12:00+01:00", False, "2025-03-04"),
]


@pytest.mark.parametrize(("text", "want", "assumed", "day"), DATETIMES)
def test_datetimes_keep_their_offset_and_assume_only_when_none(
    text: str, want: str, assumed: bool, day: str
) -> None:
    path = compile_fhirpath("authoredOn", "Task")
    note = Assumed()
    assert read_fhir(Reader.DATETIME, text, path, "Task", CHICAGO, note) == want
    assert note.zone is assumed
    assert read_fhir(Reader.DATE, text, path, "Task", CHICAGO, Assumed()) == day


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2025-02-30", "impossible date"),
        ("2025-13-01", "impossible date"),
        ("04/03/2025", "not a FHIR date or dateTime"),
        ("2025-03-04T10:12:00+15:00", "offset out of range"),
        (20250304, "not a FHIR date or dateTime"),
    ],
)
def test_bad_datetimes_say_why_without_the_value(value: Any, reason: str) -> None:
    with pytest.raises(BadValue) as caught:
        read(Reader.DATETIME, value, "authoredOn")
    assert reason in str(caught.value)
    assert str(value) not in str(caught.value)


@pytest.mark.parametrize(
    ("reader", "value", "text"),
    [
        (Reader.INT, "three", "restriction.repetitions"),
        (Reader.INT, True, "restriction.repetitions"),
        (Reader.DECIMAL, "1,5", "restriction.repetitions"),
        (Reader.IDENTIFIER, "not an object", "focus"),
        (Reader.STRING, {"an": "object"}, "status"),
    ],
)
def test_values_of_the_wrong_shape_are_bad_values(reader: Reader, value: Any, text: str) -> None:
    with pytest.raises(BadValue):
        read(reader, value, text)


@pytest.mark.parametrize(
    ("system", "want"),
    [
        ("urn:oid:2.16.840.1.113883.19.5", "2.16.840.1.113883.19.5"),
        ("urn:refloop:assigner:ACME", "ACME"),
        ("http://hl7.org/fhir/sid/us-npi", "http://hl7.org/fhir/sid/us-npi"),
        ("urn:oid:", "urn:oid:"),
    ],
)
def test_namespaces(system: str, want: str) -> None:
    assert namespace(system) == want


def test_parse_datetime_tells_whether_an_offset_was_sent() -> None:
    moment, has_offset = parse_datetime("2025-03-04")
    assert moment.tzinfo is None
    assert not has_offset
    assert parse_datetime("2025-03-04T00:00:00Z")[1]
