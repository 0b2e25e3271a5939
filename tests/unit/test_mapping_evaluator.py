"""The mapping evaluator, table by table: small mappings written as YAML text, loaded with
the real loader, run over synthetic messages; events, fields, diagnostics and outcome."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.domain.events import CLEAR, Diagnostic, Normalised, Outcome
from engine.domain.referral import Event
from engine.mapping.mapset import MappingSet, MappingSetError, load_mapping_set

RECEIVED = datetime(2025, 3, 4, 16, 0, tzinfo=UTC)
MSH = "MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20250304101500-0600||ORM^O01^ORM_O01|C1|P|2.5.1"
PID = "PID|1||555^^^HOSP^PI~12345^^^HOSP^MR||DOE^JANE^Q||19800101|F"
ORC = "ORC|NW|PLC1^EHR"
NOT_SENT = object()  # the field is not in the event at all

VALUESETS = {
    # Case-insensitive, strict (on_unmapped defaults to error).
    "order_status": """\
        schema: referral-valueset/v1
        id: order_status
        case_sensitive: false
        map: {CM: completed, IP: in_progress, CA: cancelled}
        """,
    # The set's own policy is warn.
    "priority": """\
        schema: referral-valueset/v1
        id: priority
        on_unmapped: warn
        map: {S: stat, R: routine}
        """,
    # Codes YAML 1.1 would turn into booleans, an octal and a date.
    "regions": """\
        schema: referral-valueset/v1
        id: regions
        map:
          NO: norway
          ON: ontario
          010: leading-zero
          1980-01-01: date-like
          Y: yes-letter
        """,
}


def seg(name: str, fields: Mapping[int, str]) -> str:
    """A segment with the given 1-based fields set and the rest empty."""
    return "|".join([name, *(fields.get(n, "") for n in range(1, max(fields) + 1))])


def write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def load(tmp_path: Path, mapping: str, **extra: str) -> MappingSet:
    """A set with one shared mapping, the standard value sets and any ``extra`` files."""
    files = {f"valuesets/{k}.yaml": v for k, v in VALUESETS.items()}
    files["hl7v2/x.map.yaml"] = mapping
    files.update(extra)
    write(tmp_path, files)
    return load_mapping_set(tmp_path)


def normalise(mapset: MappingSet, *segments: str, overlay: str | None = None) -> Normalised:
    return mapset.normalise("\r".join(segments) + "\r", received_at=RECEIVED, overlay=overlay)


def mapping(
    rules: str,
    *,
    defaults: str = "timezone: America/Chicago, on_no_match: ignore",
    segments: str = "",
    match: str = 'message_type: "*"',
    mapping_id: str = "t.orders",
    field_sets: str = "",
) -> str:
    """Mapping text around ``rules`` (a YAML list, written at column 0)."""
    out = [
        "schema: referral-mapping/v1",
        f"id: {mapping_id}",
        f"match: {{{match}}}",
        f"defaults: {{{defaults}}}",
    ]
    if segments:
        out.append(f"segments: {{{segments}}}")
    if field_sets:
        out.append("field_sets:\n" + textwrap.indent(textwrap.dedent(field_sets), "  "))
    out.append("rules:\n" + textwrap.indent(textwrap.dedent(rules), "  "))
    return "\n".join(out) + "\n"


def one_field(field: str, spec: str, emit: str = "referral.updated") -> str:
    """A rule that emits ``emit`` with the placer order key and one field under test."""
    return mapping(
        f"""\
        - id: r
          emit: {emit}
          fields:
            correlate.placer_order: {{path: ORC-2, as: identifier}}
            {field}: {spec}
        """,
        segments="ignore: [PID, NTE, OBR, PRD, AIS, OBX]",
    )


def codes(result: Normalised, severity: str | None = None) -> list[str]:
    return [d.code for d in result.diagnostics if severity is None or d.severity == severity]


def only(result: Normalised, code: str) -> Diagnostic:
    found = [d for d in result.diagnostics if d.code == code]
    assert len(found) == 1, result.diagnostics
    return found[0]


# ---- value sources and modifiers: one field, one message, one expected value ----------

VALUE_TABLE: list[tuple[str, str, str, list[str], Any]] = [
    # id, field, spec, body segments after MSH, expected value of the field
    ("path", "note", "NTE-3", [ORC, "NTE|1||hello"], "hello"),
    (
        "path-escapes",
        "note",
        "NTE-3",
        [ORC, "NTE|1||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"],
        "a|b^c&d~e\\f",
    ),
    ("path-absent", "note", "NTE-3", [ORC, "NTE|1||"], NOT_SENT),
    ("path-beyond-end", "note", "NTE-3", [ORC, "NTE|1"], NOT_SENT),
    ("path-no-segment", "note", "NTE-3", [ORC], NOT_SENT),
    ("path-null-clears", "note", "NTE-3", [ORC, 'NTE|1||""'], CLEAR),
    ("on-null-clear", "note", "{path: NTE-3, on_null: clear}", [ORC, 'NTE|1||""'], CLEAR),
    ("on-null-ignore", "note", "{path: NTE-3, on_null: ignore}", [ORC, 'NTE|1||""'], NOT_SENT),
    ("path-component", "note", "PID-5.2", [ORC, PID], "JANE"),
    ("path-occurrence", "note", "NTE[2]-3", [ORC, "NTE|1||one", "NTE|2||two"], "two"),
    ("path-repetition", "note", "PID-3[2].1", [ORC, PID], "12345"),
    ("path-rep-filter", "note", '"PID-3[.5=MR].1"', [ORC, PID], "12345"),
    ("path-rep-filter-miss", "note", '"PID-3[.5=SS].1"', [ORC, PID], NOT_SENT),
    (
        "path-segment-filter",
        "note",
        '"PRD[1=RT]-2.1"',
        [ORC, "PRD|RP|REFERRER^ANN", "PRD|RT^Referred to^HL70286|SPECIALIST^BOB"],
        "SPECIALIST",
    ),
    ("path-segment-filter-miss", "note", '"PRD[1=CP]-2.1"', [ORC, "PRD|RP|A^B"], NOT_SENT),
    ("as-string", "note", "{path: NTE-3, as: string}", [ORC, "NTE|1||x\\S\\y"], "x^y"),
    # const: codes stay what the analyst typed (R14)
    ("const-NO", "priority", "{const: NO}", [ORC], "NO"),
    ("const-ON", "priority", "{const: ON}", [ORC], "ON"),
    ("const-010", "priority", "{const: 010}", [ORC], "010"),
    ("const-date", "priority", "{const: 1980-01-01}", [ORC], "1980-01-01"),
    ("const-yes", "priority", "{const: yes}", [ORC], "yes"),
    # first_of: the first present alternative, whole values (R6)
    (
        "first-of-first",
        "recipient.identifier",
        "{first_of: [{path: ORC-3, as: identifier}, {path: OBR-3, as: identifier}]}",
        ["ORC|NW|PLC1^EHR|F1^LAB", "OBR|1||F2^RAD"],
        {"value": "F1", "namespace": "LAB"},
    ),
    (
        "first-of-falls-back",
        "recipient.identifier",
        "{first_of: [{path: ORC-3, as: identifier}, {path: OBR-3, as: identifier}]}",
        ["ORC|NW|PLC1^EHR", "OBR|1||F2^RAD"],
        {"value": "F2", "namespace": "RAD"},
    ),
    (
        "first-of-whole-value",  # ORC-3 has no namespace: OBR-3's must not be borrowed
        "recipient.identifier",
        "{first_of: [{path: ORC-3, as: identifier}, {path: OBR-3, as: identifier}]}",
        ["ORC|NW|PLC1^EHR|F1", "OBR|1||F2^RAD"],
        {"value": "F1"},
    ),
    (
        "first-of-none",
        "note",
        "{first_of: [NTE-3, OBR-13]}",
        [ORC, "NTE|1||", "OBR|1"],
        NOT_SENT,
    ),
    (
        "first-of-null-then-value",
        "note",
        "{first_of: [NTE-3, OBR-13]}",
        [ORC, 'NTE|1||""', seg("OBR", {1: "1", 13: "note"})],
        "note",
    ),
    (
        "first-of-null-only",
        "note",
        "{first_of: [NTE-3, OBR-13]}",
        [ORC, 'NTE|1||""', "OBR|1"],
        CLEAR,
    ),
    (
        "first-of-when-skips",
        "note",
        "{first_of: [{when: {path: NTE-2, equals: P}, value: NTE-3}, OBR-13]}",
        [ORC, "NTE|1|L|from nte", seg("OBR", {1: "1", 13: "from obr"})],
        "from obr",
    ),
    (
        "first-of-when-takes",
        "note",
        "{first_of: [{when: {path: NTE-2, equals: P}, value: NTE-3}, OBR-13]}",
        [ORC, "NTE|1|P|from nte", seg("OBR", {1: "1", 13: "from obr"})],
        "from nte",
    ),
    (
        "first-of-unmapped-falls-through",  # a warn-mapped code is no value: next one
        "priority",
        "{first_of: [{path: ORC-7.6, map: priority}, {path: OBR-27.6, map: priority}]}",
        ["ORC|NW|PLC1^EHR|||||^^^^^X", seg("OBR", {1: "1", 27: "^^^^^S"})],
        "stat",
    ),
    # concat: scalars joined, absent parts skipped
    ("concat", "note", '{concat: [PID-5.2, PID-5.1], sep: " "}', [ORC, PID], "JANE DOE"),
    (
        "concat-skips-absent",
        "note",
        '{concat: [PID-5.2, PID-5.4, PID-5.1], sep: "/"}',
        [ORC, PID],
        "JANE/DOE",
    ),
    ("concat-default-sep", "note", "{concat: [PID-5.2, PID-5.1]}", [ORC, PID], "JANE, DOE"),
    ("concat-all-absent", "note", "{concat: [PID-5.4, PID-5.5]}", [ORC, PID], NOT_SENT),
    ("concat-const", "note", '{concat: [{const: "Dr"}, PID-5.1], sep: " "}', [ORC, PID], "Dr DOE"),
    (
        "concat-decimal",
        "note",
        "{concat: [{path: OBX-5, as: decimal}]}",
        [ORC, "OBX|1|NM|||1.50"],
        "1.50",
    ),
    # join: a list, empties skipped, escapes resolved
    (
        "join-segments",
        "note",
        '{join: "NTE[*]-3", sep: "; "}',
        [ORC, "NTE|1||a", "NTE|2||", "NTE|3||c\\T\\d"],
        "a; c&d",
    ),
    (
        "join-repetitions",
        "note",
        '{join: "OBR-31[*].2"}',
        [ORC, seg("OBR", {1: "1", 31: "A^Chest~B^Pain"})],
        "Chest, Pain",
    ),
    ("join-nothing", "note", '{join: "NTE[*]-3"}', [ORC], NOT_SENT),
    (
        "join-newline",
        "note",
        '{join: "NTE[*]-3", sep: "\\n"}',
        [ORC, "NTE|1||a", "NTE|2||b"],
        "a\nb",
    ),
    # count
    (
        "count-segments",
        "duration_minutes",
        '{count: "NTE[*]"}',
        [ORC, "NTE|1", "NTE|2", "NTE|3"],
        3,
    ),
    ("count-repetitions", "duration_minutes", '{count: "PID-3[*]"}', [ORC, PID], 2),
    ("count-none", "duration_minutes", '{count: "NTE[*]"}', [ORC], 0),
    # typed readers
    ("as-int", "duration_minutes", "{path: AIS-7, as: int}", [ORC, "AIS|1|A||||| 30 "], 30),
    ("as-int-bad", "duration_minutes", "{path: AIS-7, as: int}", [ORC, "AIS|1|A|||||3x"], NOT_SENT),
    ("as-date", "patient.birth_date", "{path: PID-7, as: date}", [ORC, PID], "1980-01-01"),
    (
        "as-date-from-ts",
        "patient.birth_date",
        "{path: PID-7, as: date}",
        [ORC, "PID|1||1^^^H^MR||X||198001011230-0500"],
        "1980-01-01",
    ),
    (
        "as-datetime-offset",
        "requested_at",
        "{path: ORC-9, as: datetime}",
        ["ORC|NW|PLC1^EHR|||||||20250304101200+0100"],
        "2025-03-04T10:12:00+01:00",
    ),
    (
        "as-datetime-winter",
        "requested_at",
        "{path: ORC-9, as: datetime}",
        ["ORC|NW|PLC1^EHR|||||||202503041012"],
        "2025-03-04T10:12:00-06:00",
    ),
    (
        "as-datetime-summer",  # the zone, not a fixed offset: CDT in July
        "requested_at",
        "{path: ORC-9, as: datetime}",
        ["ORC|NW|PLC1^EHR|||||||20250704101200"],
        "2025-07-04T10:12:00-05:00",
    ),
    (
        "as-datetime-ts-composite",  # v2.3 TS: time^precision
        "requested_at",
        "{path: ORC-9, as: datetime}",
        ["ORC|NW|PLC1^EHR|||||||20250304101200-0600^S"],
        "2025-03-04T10:12:00-06:00",
    ),
    (
        "as-datetime-fraction",
        "requested_at",
        "{path: ORC-9, as: datetime}",
        ["ORC|NW|PLC1^EHR|||||||20250304101200.25-0600"],
        "2025-03-04T10:12:00.250000-06:00",
    ),
    (
        "as-datetime-impossible",
        "requested_at",
        "{path: ORC-9, as: datetime}",
        ["ORC|NW|PLC1^EHR|||||||20251341"],
        NOT_SENT,
    ),
    (
        "as-identifier-cx",
        "patient.identifier",
        '{path: "PID-3[1]", as: identifier}',
        [ORC, PID],
        {"value": "555", "namespace": "HOSP", "type": "PI"},
    ),
    (
        "as-identifier-cx-universal",  # CX.4.2 when CX.4.1 is empty
        "patient.identifier",
        "{path: PID-3, as: identifier}",
        [ORC, "PID|1||777^^^&1.2.3&ISO^MR"],
        {"value": "777", "namespace": "1.2.3", "type": "MR"},
    ),
    (
        "as-identifier-ei",
        "requester.identifier",
        "{path: OBR-2, as: identifier}",
        [ORC, "OBR|1|P\\S\\9^NS"],
        {"value": "P^9", "namespace": "NS"},
    ),
    (
        "as-identifier-xcn",
        "requester.identifier",
        '{path: "ORC-12[1]", as: identifier}',
        ["ORC|NW|PLC1^EHR||||||||||1234^DOC^ONE^^^^^^NPI"],
        {"value": "1234", "namespace": "NPI"},
    ),
    (
        "as-identifier-component",
        "requester.identifier",
        "{path: ORC-2.1, as: identifier}",
        [ORC],
        {"value": "PLC1"},
    ),
    (
        "as-identifier-empty",
        "requester.identifier",
        "{path: OBR-2, as: identifier}",
        [ORC, "OBR|1|^NS"],
        NOT_SENT,
    ),
    (
        "as-coding",
        "service",
        "{path: OBR-4, as: coding}",
        [ORC, "OBR|1|||CARD^Cardiology \\T\\ vascular^L"],
        {"code": "CARD", "display": "Cardiology & vascular", "system": "L"},
    ),
    (
        "as-coding-code-only",
        "service",
        "{path: OBR-4, as: coding}",
        [ORC, "OBR|1|||CARD"],
        {"code": "CARD"},
    ),
    (
        "as-person-name-xpn",
        "patient.name",
        '{path: "PID-5[1]", as: person_name}',
        [ORC, PID],
        {"family": "DOE", "given": "JANE", "middle": "Q"},
    ),
    (
        "as-person-name-xcn",
        "requester.name",
        '{path: "ORC-12[1]", as: person_name}',
        ["ORC|NW|PLC1^EHR||||||||||1234^DOC^ONE^^^^^^NPI"],
        {"family": "DOC", "given": "ONE"},
    ),
    # map: value sets
    (
        "map-hit",
        "status",
        "{path: ORC-5, map: order_status}",
        ["ORC|NW|PLC1^EHR|||CM"],
        "completed",
    ),
    (
        "map-case-folded",
        "status",
        "{path: ORC-5, map: order_status}",
        ["ORC|NW|PLC1^EHR|||cm"],
        "completed",
    ),
    (
        "map-warn-drops",
        "priority",
        "{path: ORC-7.6, map: priority}",
        ["ORC|NW|PLC1^EHR|||||^^^^^X"],
        NOT_SENT,
    ),
    (
        "map-warn-default",
        "priority",
        "{path: ORC-7.6, map: priority, default: routine}",
        ["ORC|NW|PLC1^EHR|||||^^^^^X"],
        "routine",
    ),
    (
        "map-passthrough",
        "priority",
        "{path: ORC-7.6, map: priority, on_unmapped: passthrough}",
        ["ORC|NW|PLC1^EHR|||||^^^^^X"],
        "X",
    ),
    (
        "map-NO",
        "category",
        "{path: PID-8, map: regions}",
        [ORC, seg("PID", {1: "1", 8: "NO"})],
        "norway",
    ),
    (
        "map-ON",
        "category",
        "{path: PID-8, map: regions}",
        [ORC, seg("PID", {1: "1", 8: "ON"})],
        "ontario",
    ),
    (
        "map-010",
        "category",
        "{path: PID-8, map: regions}",
        [ORC, seg("PID", {1: "1", 8: "010"})],
        "leading-zero",
    ),
    (
        "map-date-code",
        "category",
        "{path: PID-8, map: regions}",
        [ORC, seg("PID", {1: "1", 8: "1980-01-01"})],
        "date-like",
    ),
    (
        "map-case-sensitive",
        "category",
        "{path: PID-8, map: regions, on_unmapped: passthrough}",
        [ORC, seg("PID", {1: "1", 8: "no"})],
        "no",
    ),
    # transforms
    ("trim", "note", "{path: NTE-3, transform: [trim]}", [ORC, "NTE|1||  padded  "], "padded"),
    ("no-trim", "note", "NTE-3", [ORC, "NTE|1||  padded  "], "  padded  "),
    ("upper", "note", "{path: NTE-3, transform: [upper]}", [ORC, "NTE|1||MiXed"], "MIXED"),
    ("lower", "note", "{path: NTE-3, transform: [lower]}", [ORC, "NTE|1||MiXed"], "mixed"),
    (
        "digits",
        "note",
        "{path: NTE-3, transform: [digits]}",
        [ORC, "NTE|1||(555) 123-4567"],
        "5551234567",
    ),
    (
        "digits-to-nothing",
        "note",
        "{path: NTE-3, transform: [digits]}",
        [ORC, "NTE|1||none"],
        NOT_SENT,
    ),
    (
        "truncate",
        "note",
        "{path: NTE-3, transform: [{truncate: 4}]}",
        [ORC, "NTE|1||abcdefgh"],
        "abcd",
    ),
    (
        "replace",
        "note",
        "{path: NTE-3, transform: [{replace: {from: '-', to: ''}}]}",
        [ORC, "NTE|1||12-34-56"],
        "123456",
    ),
    (
        "transforms-in-order",
        "note",
        "{path: NTE-3, transform: [trim, upper, {truncate: 3}]}",
        [ORC, "NTE|1|| abcdef"],
        "ABC",
    ),
    (
        "transform-before-map",
        "status",
        "{path: NTE-3, transform: [trim], map: order_status}",
        [ORC, "NTE|1|| CM "],
        "completed",
    ),
    (
        "add-minutes",
        "end",
        "{path: AIS-4, as: datetime, transform: [{add_minutes: {path: AIS-7, as: int}}]}",
        [ORC, "AIS|1|A||20250318140000-0500|||45"],
        "2025-03-18T14:45:00-05:00",
    ),
    (
        "add-minutes-no-duration",
        "end",
        "{path: AIS-4, as: datetime, transform: [{add_minutes: {path: AIS-7, as: int}}]}",
        [ORC, "AIS|1|A||20250318140000-0500"],
        "2025-03-18T14:00:00-05:00",
    ),
    (
        "tz",
        "start",
        "{path: AIS-4, as: datetime, transform: [{tz: UTC}]}",
        [ORC, "AIS|1|A||20250318140000-0500"],
        "2025-03-18T19:00:00+00:00",
    ),
    (
        "tz-named-zone",
        "start",
        "{path: AIS-4, as: datetime, transform: [{tz: Europe/Paris}]}",
        [ORC, "AIS|1|A||20250318140000-0500"],
        "2025-03-18T20:00:00+01:00",
    ),
    # default
    ("default-when-absent", "priority", "{path: ORC-7.6, default: routine}", [ORC], "routine"),
    (
        "default-not-when-null",
        "priority",
        "{path: ORC-7.6, default: routine}",
        ['ORC|NW|PLC1^EHR|||||^^^^^""'],
        CLEAR,
    ),
    (
        "default-not-when-value",
        "priority",
        "{path: ORC-7.6, default: routine}",
        ["ORC|NW|PLC1^EHR|||||^^^^^S"],
        "S",
    ),
]

_APPOINTMENT_FIELDS = {"duration_minutes", "end", "start"}


@pytest.mark.parametrize(
    ("field", "spec", "body", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in VALUE_TABLE],
)
def test_value_table(tmp_path: Path, field: str, spec: str, body: list[str], expected: Any) -> None:
    emit = "appointment.completed" if field in _APPOINTMENT_FIELDS else "referral.updated"
    mapset = load(tmp_path, one_field(field, spec, emit))
    result = normalise(mapset, MSH, *body)
    assert result.outcome is Outcome.PROCESSED, result.diagnostics
    (event,) = result.events
    assert event.fields["correlate.placer_order"] == {"value": "PLC1", "namespace": "EHR"}
    if expected is NOT_SENT:
        assert field not in event.fields
    else:
        assert event.fields[field] == expected
        assert type(event.fields[field]) is type(expected)


# ---- diagnostics of value specs -------------------------------------------------------


def test_bad_typed_value_is_a_warning_naming_the_path_not_the_value(tmp_path: Path) -> None:
    mapset = load(tmp_path, one_field("requested_at", "{path: ORC-9, as: datetime}"))
    result = normalise(mapset, MSH, "ORC|NW|PLC1^EHR|||||||SECRET-VALUE")
    assert result.outcome is Outcome.PROCESSED
    diag = only(result, "invalid_value")
    assert (diag.severity, diag.path, diag.rule, diag.field) == (
        "warning",
        "ORC-9",
        "r",
        "requested_at",
    )
    assert "SECRET-VALUE" not in diag.message


def test_timezone_assumed_is_reported_with_path_and_zone(tmp_path: Path) -> None:
    mapset = load(tmp_path, one_field("requested_at", "{path: ORC-9, as: datetime}"))
    naive = normalise(mapset, MSH, "ORC|NW|PLC1^EHR|||||||202503041012")
    diag = only(naive, "timezone_assumed")
    assert (diag.severity, diag.path, diag.field) == ("info", "ORC-9", "requested_at")
    assert "America/Chicago" in diag.message
    with_offset = normalise(mapset, MSH, "ORC|NW|PLC1^EHR|||||||202503041012-0600")
    assert "timezone_assumed" not in codes(with_offset)


@pytest.mark.parametrize(
    ("spec", "body", "severity", "outcome", "value"),
    [
        pytest.param(
            "{path: ORC-5, map: order_status}",
            "ORC|NW|PLC1^EHR|||ZZ",
            "error",
            Outcome.MAPPING_ERROR,
            NOT_SENT,
            id="valueset-default-error",
        ),
        pytest.param(
            "{path: ORC-5, map: order_status, on_unmapped: warn}",
            "ORC|NW|PLC1^EHR|||ZZ",
            "warning",
            Outcome.PROCESSED,
            NOT_SENT,
            id="spec-warn-overrides-set",
        ),
        pytest.param(
            "{path: ORC-5, map: priority}",
            "ORC|NW|PLC1^EHR|||ZZ",
            "warning",
            Outcome.PROCESSED,
            NOT_SENT,
            id="valueset-own-warn",
        ),
        pytest.param(
            "{path: ORC-5, map: priority, on_unmapped: error}",
            "ORC|NW|PLC1^EHR|||ZZ",
            "error",
            Outcome.MAPPING_ERROR,
            NOT_SENT,
            id="spec-error-overrides-set",
        ),
        pytest.param(
            "{path: ORC-5, map: priority, on_unmapped: passthrough}",
            "ORC|NW|PLC1^EHR|||ZZ",
            "warning",
            Outcome.PROCESSED,
            "ZZ",
            id="passthrough-still-reported",
        ),
    ],
)
def test_unmapped_codes_follow_the_policy_and_are_always_reported(
    tmp_path: Path, spec: str, body: str, severity: str, outcome: Outcome, value: Any
) -> None:
    mapset = load(tmp_path, one_field("status", spec))
    result = normalise(mapset, MSH, body)
    assert result.outcome is outcome
    diag = only(result, "unmapped_code")
    assert (diag.severity, diag.path, diag.field, diag.rule) == (severity, "ORC-5", "status", "r")
    assert "'ZZ'" in diag.message  # a code is not PHI: the analyst needs to see it
    if outcome is Outcome.MAPPING_ERROR:
        assert result.events == ()
    elif value is NOT_SENT:
        assert "status" not in result.events[0].fields
    else:
        assert result.events[0].fields["status"] == value


def test_default_used_is_an_info_diagnostic(tmp_path: Path) -> None:
    mapset = load(tmp_path, one_field("priority", "{path: ORC-7.6, default: routine}"))
    used = normalise(mapset, MSH, ORC)
    diag = only(used, "default_used")
    assert (diag.severity, diag.field, diag.rule) == ("info", "priority", "r")
    assert "'routine'" in diag.message
    assert "x.map.yaml:" in diag.message  # points at the spec
    assert "default_used" not in codes(normalise(mapset, MSH, "ORC|NW|PLC1^EHR|||||^^^^^S"))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("NTE|1||", id="absent"),
        pytest.param('NTE|1||""', id="null"),
    ],
)
def test_required_missing_fails_the_whole_message(tmp_path: Path, body: str) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: first
              emit: referral.updated
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            - id: second
              emit: referral.updated
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
                note: {path: NTE-3, required: true}
            """
        ),
    )
    result = normalise(mapset, MSH, ORC, body)
    assert result.outcome is Outcome.MAPPING_ERROR
    assert result.events == ()  # all or nothing: the first rule's event is discarded too
    diag = only(result, "required_value_missing")
    assert (diag.severity, diag.rule, diag.field, diag.path) == ("error", "second", "note", "NTE-3")
    assert result.mapping_id == "t.orders"


def test_required_first_of_names_every_alternative(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        one_field(
            "recipient.identifier",
            "{first_of: [{path: ORC-3, as: identifier}, {path: OBR-3, as: identifier}], "
            "required: true}",
        ),
    )
    result = normalise(mapset, MSH, ORC)
    assert only(result, "required_value_missing").path == "ORC-3 | OBR-3"
    assert normalise(mapset, MSH, ORC, "OBR|1||F^X").outcome is Outcome.PROCESSED


def test_catalogue_required_field_cleared_by_null_fails(tmp_path: Path) -> None:
    """referral.created requires patient.identifier: an HL7 null does not satisfy it."""
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: new
              emit: referral.created
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
                patient.identifier: {path: PID-3, as: identifier, required: true}
            """
        ),
    )
    ok = normalise(mapset, MSH, "PID|1||1^^^H^MR", ORC)
    assert ok.outcome is Outcome.PROCESSED
    failed = normalise(mapset, MSH, 'PID|1||""', ORC)
    assert failed.outcome is Outcome.MAPPING_ERROR
    assert "required_value_missing" in codes(failed, "error")


def test_transform_on_the_wrong_kind_of_value_is_an_error(tmp_path: Path) -> None:
    mapset = load(tmp_path, one_field("note", "{path: NTE-3, transform: [{tz: UTC}]}"))
    result = normalise(mapset, MSH, ORC, "NTE|1||not a time")
    assert result.outcome is Outcome.MAPPING_ERROR
    assert only(result, "invalid_value").field == "note"


# ---- the three value states -----------------------------------------------------------


@pytest.mark.parametrize(
    ("nte", "present", "absent", "is_null", "field"),
    [
        pytest.param("NTE|1||text", True, False, False, "text", id="value"),
        pytest.param("NTE|1||", False, True, False, NOT_SENT, id="absent-empty"),
        pytest.param("NTE|1", False, True, False, NOT_SENT, id="absent-beyond-end"),
        pytest.param('NTE|1||""', False, False, True, CLEAR, id="null"),
    ],
)
def test_three_value_states(
    tmp_path: Path, nte: str, present: bool, absent: bool, is_null: bool, field: Any
) -> None:
    rules = "".join(
        f"- id: {name}\n"
        "  emit: referral.updated\n"
        f"  when: {{{name}: NTE-3}}\n"
        "  fields:\n"
        "    correlate.placer_order: {path: ORC-2, as: identifier}\n"
        "    note: NTE-3\n"
        for name in ("present", "absent", "is_null")
    )
    mapset = load(tmp_path, mapping(rules))
    result = normalise(mapset, MSH, ORC, nte)
    fired = {e.rule_id for e in result.events}
    assert fired == {
        name
        for name, holds in (("present", present), ("absent", absent), ("is_null", is_null))
        if holds
    }
    for event in result.events:
        if field is NOT_SENT:
            assert "note" not in event.fields
        else:
            assert event.fields["note"] == field


# ---- conditions -----------------------------------------------------------------------

CONDITION_TABLE: list[tuple[str, str, list[str], bool]] = [
    # id, condition, body after MSH, holds
    ("present-value", "{present: ORC-5}", ["ORC|NW|PLC1^EHR|||CM"], True),
    ("present-absent", "{present: ORC-5}", [ORC], False),
    ("present-null", "{present: ORC-5}", ['ORC|NW|PLC1^EHR|||""'], False),
    ("present-segment", "{present: NTE}", [ORC, "NTE|1"], True),
    ("present-no-segment", "{present: NTE}", [ORC], False),
    ("absent-absent", "{absent: ORC-5}", [ORC], True),
    ("absent-null", "{absent: ORC-5}", ['ORC|NW|PLC1^EHR|||""'], False),
    ("absent-value", "{absent: ORC-5}", ["ORC|NW|PLC1^EHR|||CM"], False),
    ("is-null-null", "{is_null: ORC-5}", ['ORC|NW|PLC1^EHR|||""'], True),
    ("is-null-absent", "{is_null: ORC-5}", [ORC], False),
    ("is-null-value", "{is_null: ORC-5}", ["ORC|NW|PLC1^EHR|||CM"], False),
    ("equals", "{path: ORC-1, equals: NW}", [ORC], True),
    ("equals-other", "{path: ORC-1, equals: CA}", [ORC], False),
    ("equals-case-sensitive", "{path: ORC-1, equals: nw}", [ORC], False),
    ("equals-absent", "{path: ORC-5, equals: CM}", [ORC], False),
    ("equals-null-is-not-quotes", "{path: ORC-5, equals: '\"\"'}", ['ORC|NW|PLC1^EHR|||""'], False),
    ("equals-unescaped", "{path: NTE-3, equals: 'a|b'}", [ORC, "NTE|1||a\\F\\b"], True),
    ("equals-NO", "{path: PID-8, equals: NO}", [ORC, seg("PID", {1: "1", 8: "NO"})], True),
    ("equals-010", "{path: PID-8, equals: 010}", [ORC, seg("PID", {1: "1", 8: "010"})], True),
    (
        "equals-010-not-10",
        "{path: PID-8, equals: 010}",
        [ORC, seg("PID", {1: "1", 8: "10"})],
        False,
    ),
    ("equals-component", "{path: MSH-9.2, equals: O01}", [ORC], True),
    ("in", "{path: ORC-1, in: [CA, NW, DC]}", [ORC], True),
    ("in-miss", "{path: ORC-1, in: [CA, DC]}", [ORC], False),
    ("in-ON", "{path: PID-8, in: [NO, ON]}", [ORC, seg("PID", {1: "1", 8: "ON"})], True),
    ("starts-with", "{path: ORC-2.1, starts_with: PLC}", [ORC], True),
    ("starts-with-miss", "{path: ORC-2.1, starts_with: LC}", [ORC], False),
    ("in-valueset", "{path: ORC-5, in_valueset: order_status}", ["ORC|NW|PLC1^EHR|||ip"], True),
    (
        "in-valueset-miss",
        "{path: ORC-5, in_valueset: order_status}",
        ["ORC|NW|PLC1^EHR|||XX"],
        False,
    ),
    ("in-valueset-absent", "{path: ORC-5, in_valueset: order_status}", [ORC], False),
    (
        "map-equals",
        "{path: ORC-5, map: order_status, equals: completed}",
        ["ORC|NW|PLC1^EHR|||CM"],
        True,
    ),
    (
        "map-equals-code-is-not-translation",
        "{path: ORC-5, map: order_status, equals: CM}",
        ["ORC|NW|PLC1^EHR|||CM"],
        False,
    ),
    (
        "map-equals-unmapped",
        "{path: ORC-5, map: order_status, equals: completed}",
        ["ORC|NW|PLC1^EHR|||ZZ"],
        False,
    ),
    (
        "map-in",
        "{path: ORC-5, map: order_status, in: [cancelled, completed]}",
        ["ORC|NW|PLC1^EHR|||CA"],
        True,
    ),
    ("count-eq", '{count: "NTE[*]", eq: 2}', [ORC, "NTE|1", "NTE|2"], True),
    ("count-eq-miss", '{count: "NTE[*]", eq: 2}', [ORC, "NTE|1"], False),
    ("count-eq-zero", '{count: "NTE[*]", eq: 0}', [ORC], True),
    ("count-gte", '{count: "NTE[*]", gte: 2}', [ORC, "NTE|1", "NTE|2"], True),
    ("count-gte-miss", '{count: "NTE[*]", gte: 2}', [ORC, "NTE|1"], False),
    ("count-lte", '{count: "NTE[*]", lte: 1}', [ORC, "NTE|1"], True),
    ("count-lte-miss", '{count: "NTE[*]", lte: 1}', [ORC, "NTE|1", "NTE|2"], False),
    ("count-gt", '{count: "NTE[*]", gt: 1}', [ORC, "NTE|1", "NTE|2"], True),
    ("count-gt-miss", '{count: "NTE[*]", gt: 1}', [ORC, "NTE|1"], False),
    ("count-lt", '{count: "NTE[*]", lt: 1}', [ORC], True),
    ("count-lt-miss", '{count: "NTE[*]", lt: 1}', [ORC, "NTE|1"], False),
    ("count-repetitions", '{count: "PID-3[*]", eq: 2}', [ORC, PID], True),
    ("count-skips-empty-field", '{count: "NTE[*]-3", eq: 1}', [ORC, "NTE|1||a", "NTE|2||"], True),
    ("all", "{all: [{path: ORC-1, equals: NW}, {present: ORC-2}]}", [ORC], True),
    ("all-one-false", "{all: [{path: ORC-1, equals: NW}, {present: ORC-5}]}", [ORC], False),
    ("all-empty", "{all: []}", [ORC], True),
    ("any", "{any: [{path: ORC-1, equals: CA}, {present: ORC-2}]}", [ORC], True),
    ("any-none", "{any: [{path: ORC-1, equals: CA}, {present: ORC-5}]}", [ORC], False),
    ("any-empty", "{any: []}", [ORC], False),
    ("not", "{not: {path: ORC-1, equals: CA}}", [ORC], True),
    ("not-true", "{not: {present: ORC-2}}", [ORC], False),
    (
        "nested",
        "{all: [{not: {absent: ORC-2}}, {any: [{is_null: ORC-5}, {path: ORC-1, in: [NW]}]}]}",
        [ORC],
        True,
    ),
]


@pytest.mark.parametrize(
    ("condition", "body", "holds"),
    [pytest.param(*row[1:], id=row[0]) for row in CONDITION_TABLE],
)
def test_condition_table(tmp_path: Path, condition: str, body: list[str], holds: bool) -> None:
    mapset = load(
        tmp_path,
        mapping(
            f"""\
            - id: guarded
              emit: referral.updated
              when: {condition}
              fields:
                correlate.placer_order: {{path: ORC-2, as: identifier}}
            """,
            segments="ignore: [PID, NTE]",
        ),
    )
    result = normalise(mapset, MSH, *body)
    if holds:
        assert result.outcome is Outcome.PROCESSED, result.diagnostics
        assert [e.rule_id for e in result.events] == ["guarded"]
    else:
        assert result.outcome is Outcome.IGNORED
        assert result.events == ()
        assert codes(result) == ["no_rule_matched"]


def test_match_when_selects_the_mapping(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: r
              emit: referral.updated
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            """,
            match="message_type: ORM^O01, when: {path: MSH-4.1, equals: CLINIC}",
        ),
    )
    assert normalise(mapset, MSH, ORC).outcome is Outcome.PROCESSED
    other = normalise(mapset, MSH.replace("|CLINIC|", "|ELSEWHERE|"), ORC)
    assert other.outcome is Outcome.MAPPING_ERROR
    assert codes(other) == ["no_mapping"]


# ---- foreach --------------------------------------------------------------------------

FOREACH = """\
- id: per_order
  emit: referral.updated
  foreach: {anchors}
  fields:
    correlate.placer_order:
      first_of:
        - {{path: ORC-2, as: identifier}}
        - {{path: OBR-2, as: identifier}}
    note: {{join: "OBX[*]-5", sep: "+"}}
    patient.identifier: {{path: PID-3, as: identifier}}
    requester.identifier: {{path: /PID-3, as: identifier}}
"""


@pytest.mark.parametrize(
    ("anchors", "body", "orders", "notes"),
    [
        pytest.param(
            "[ORC, OBR]",
            ["ORC|NW|A", "OBR|1", "OBX|1|TX|||a1", "ORC|NW|B", "OBR|1"],
            ["A", "B"],
            ["a1", None],
            id="ORC-OBR-OBX-ORC-OBR",
        ),
        pytest.param(
            "[ORC, OBR]",
            ["OBR|1|A", "OBX|1|TX|||a1", "OBR|2|B", "OBX|1|TX|||b1", "OBX|2|TX|||b2"],
            ["A", "B"],
            ["a1", "b1+b2"],
            id="OBR-OBX-OBR",
        ),
        pytest.param(
            "[ORC, OBR]",
            ["ORC|NW|A", "OBR|1", "OBR|2|B"],
            ["A", "B"],
            [None, None],
            id="ORC-OBR-OBR",
        ),
        pytest.param(
            "ORC",
            ["ORC|NW|A", "OBR|1|X", "OBX|1|TX|||a1", "OBR|2|Y", "OBX|1|TX|||a2", "ORC|NW|B"],
            ["A", "B"],
            ["a1+a2", None],
            id="single-anchor",
        ),
        pytest.param(
            "[ORC, OBR]",
            ["OBX|1|TX|||before", "NTE|1", "ORC|NW|A", "OBX|1|TX|||a1"],
            ["A"],
            ["a1"],
            id="segments-before-first-anchor",
        ),
        pytest.param(
            # The ORC opens the second order; it must not join the first (which has none).
            "[ORC, OBR]",
            ["OBR|1|A", "OBX|1|TX|||a1", "ORC|NW|B", "OBR|2|B", "OBX|1|TX|||b1"],
            ["A", "B"],
            ["a1", "b1"],
            id="OBR-OBX-ORC-OBR",
        ),
    ],
)
def test_foreach_splits_instances(
    tmp_path: Path, anchors: str, body: list[str], orders: list[str], notes: list[str | None]
) -> None:
    mapset = load(
        tmp_path,
        mapping(FOREACH.format(anchors=anchors), segments="ignore: [NTE]"),
    )
    result = normalise(mapset, MSH, "PID|1||P1^^^H^MR", *body)
    assert result.outcome is Outcome.PROCESSED, result.diagnostics
    assert [e.fields["correlate.placer_order"]["value"] for e in result.events] == orders
    assert [e.fields.get("note") for e in result.events] == notes
    assert [e.ordinal for e in result.events] == list(range(len(orders)))
    for event in result.events:
        # PID precedes the first anchor: a relative path inside foreach cannot see it,
        # an absolute one reads the whole message.
        assert "patient.identifier" not in event.fields
        assert event.fields["requester.identifier"] == {
            "value": "P1",
            "namespace": "H",
            "type": "MR",
        }


def test_foreach_conditions_are_per_instance(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: new
              emit: referral.created
              foreach: ORC
              when: {path: ORC-1, equals: NW}
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
                patient.identifier: {path: /PID-3, as: identifier, required: true}
            - id: cancel
              emit: referral.cancelled
              foreach: ORC
              when: {path: ORC-1, in: [CA, DC]}
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            """
        ),
    )
    result = normalise(mapset, MSH, "PID|1||P1^^^H^MR", "ORC|CA|A", "ORC|NW|B", "ORC|DC|C")
    got = [(e.type, e.rule_id, e.fields["correlate.placer_order"]["value"]) for e in result.events]
    # Rules run in file order; within a rule, instances in message order.
    assert got == [
        (Event.REFERRAL_CREATED, "new", "B"),
        (Event.REFERRAL_CANCELLED, "cancel", "A"),
        (Event.REFERRAL_CANCELLED, "cancel", "C"),
    ]
    assert [e.ordinal for e in result.events] == [0, 1, 2]


def test_absolute_msh_inside_foreach(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: r
              emit: referral.cancelled
              foreach: ORC
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
                occurred_at:
                  first_of:
                    - {path: ORC-9, as: datetime}
                    - {path: /MSH-7, as: datetime}
                note: MSH-10
            """
        ),
    )
    result = normalise(mapset, MSH, "ORC|CA|A|||||||20250305090000-0600", "ORC|CA|B")
    assert [e.fields["occurred_at"] for e in result.events] == [
        "2025-03-05T09:00:00-06:00",
        "2025-03-04T10:15:00-06:00",
    ]
    # A relative MSH path inside an instance finds no MSH there.
    assert all("note" not in e.fields for e in result.events)


# ---- rules: ignore, first match, no match --------------------------------------------


def test_message_level_ignore_stops_evaluation(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: emitted_before
              emit: referral.updated
              when: {path: ORC-1, equals: SN}
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            - id: lab_orders
              emit: ignore
              reason: lab orders are not referrals
              when: {path: OBR-4.1, starts_with: LAB}
            - id: after
              emit: referral.updated
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
                note: {path: NTE-3, required: true}
            """,
            segments="ignore: [OBR, NTE]",
        ),
    )
    lab = normalise(mapset, MSH, ORC, "OBR|1|||LAB123")
    assert lab.outcome is Outcome.IGNORED
    assert lab.rule_id == "lab_orders"
    assert lab.events == ()
    assert lab.diagnostics == ()  # the later rule's required field is never evaluated
    assert lab.mapping_id == "t.orders"
    assert normalise(mapset, MSH, ORC, "OBR|1|||REF1", "NTE|1||n").outcome is Outcome.PROCESSED


def test_ignore_after_an_emitting_rule_discards_nothing_but_stops(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: first
              emit: referral.updated
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            - id: stop
              emit: ignore
            - id: never
              emit: referral.cancelled
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            """
        ),
    )
    result = normalise(mapset, MSH, ORC)
    assert [e.rule_id for e in result.events] == ["first"]
    assert result.outcome is Outcome.PROCESSED


def test_instance_level_ignore_hides_instances_from_later_rules(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: skip_lab
              emit: ignore
              foreach: ORC
              when: {path: OBR-4.1, starts_with: LAB}
            - id: order
              emit: referral.updated
              foreach: ORC
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            """,
            segments="ignore: [OBR]",
        ),
    )
    mixed = normalise(mapset, MSH, "ORC|NW|A", "OBR|1|||LAB1", "ORC|NW|B", "OBR|1|||REF1")
    assert mixed.outcome is Outcome.PROCESSED
    assert [e.fields["correlate.placer_order"]["value"] for e in mixed.events] == ["B"]
    all_lab = normalise(mapset, MSH, "ORC|NW|A", "OBR|1|||LAB1", "ORC|NW|B", "OBR|1|||LAB2")
    assert all_lab.outcome is Outcome.IGNORED
    assert all_lab.rule_id == "skip_lab"
    assert all_lab.events == ()


@pytest.mark.parametrize(
    ("mode", "rules"),
    [
        pytest.param("all", ["specific", "general"], id="all"),
        pytest.param("first", ["specific"], id="first"),
    ],
)
def test_rules_all_vs_first(tmp_path: Path, mode: str, rules: list[str]) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: specific
              emit: referral.cancelled
              when: {path: ORC-1, equals: CA}
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            - id: general
              emit: referral.updated
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            """,
            defaults=f"timezone: UTC, on_no_match: error, rules: {mode}",
        ),
    )
    assert [e.rule_id for e in normalise(mapset, MSH, "ORC|CA|X").events] == rules
    assert [e.rule_id for e in normalise(mapset, MSH, "ORC|NW|X").events] == ["general"]


def test_rules_first_is_per_foreach_instance(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: cancel
              emit: referral.cancelled
              foreach: ORC
              when: {path: ORC-1, equals: CA}
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            - id: other
              emit: referral.updated
              foreach: ORC
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            """,
            defaults="timezone: UTC, rules: first",
        ),
    )
    result = normalise(mapset, MSH, "ORC|CA|A", "ORC|NW|B", "ORC|CA|C")
    got = [(e.rule_id, e.fields["correlate.placer_order"]["value"]) for e in result.events]
    assert got == [("cancel", "A"), ("cancel", "C"), ("other", "B")]


@pytest.mark.parametrize(
    ("policy", "outcome", "severity"),
    [
        pytest.param("ignore", Outcome.IGNORED, "info", id="ignore"),
        pytest.param("warn", Outcome.IGNORED, "warning", id="warn"),
        pytest.param("error", Outcome.MAPPING_ERROR, "error", id="error"),
        pytest.param(None, Outcome.MAPPING_ERROR, "error", id="default-is-error"),
    ],
)
def test_on_no_match(tmp_path: Path, policy: str | None, outcome: Outcome, severity: str) -> None:
    defaults = "timezone: UTC" + (f", on_no_match: {policy}" if policy else "")
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: cancel
              emit: referral.cancelled
              when: {path: ORC-1, equals: CA}
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            """,
            defaults=defaults,
        ),
    )
    result = normalise(mapset, MSH, "ORC|NW|A")
    assert result.outcome is outcome
    assert result.events == ()
    assert result.rule_id == ""
    diag = only(result, "no_rule_matched")
    assert diag.severity == severity
    assert "t.orders" in diag.message


# ---- coverage -------------------------------------------------------------------------

COVERAGE_RULES = """\
- id: r
  emit: referral.updated
  fields:
    correlate.placer_order: {path: ORC-2, as: identifier}
    note: PID-5.1
"""


def test_unread_segments_are_reported_once_per_name(tmp_path: Path) -> None:
    mapset = load(tmp_path, mapping(COVERAGE_RULES, segments="ignore: [PV1]"))
    result = normalise(mapset, MSH, PID, "PV1|1|O", ORC, "ZPI|1", "ZPI|2", "NTE|1||n")
    assert result.outcome is Outcome.PROCESSED
    unmapped = {d.path: d for d in result.diagnostics if d.code == "unmapped_segment"}
    assert sorted(unmapped) == ["NTE", "ZPI"]  # MSH, PID, ORC read; PV1 ignored
    assert unmapped["ZPI"].severity == "warning"
    assert unmapped["ZPI"].message.startswith("2 ZPI segment(s)")


def test_strict_coverage_makes_unread_segments_errors(tmp_path: Path) -> None:
    mapset = load(tmp_path, mapping(COVERAGE_RULES, segments="ignore: [PV1], strict: true"))
    result = normalise(mapset, MSH, PID, ORC, "ZPI|1")
    assert result.outcome is Outcome.MAPPING_ERROR
    assert result.events == ()
    assert only(result, "unmapped_segment").severity == "error"
    assert normalise(mapset, MSH, PID, "PV1|1", ORC).outcome is Outcome.PROCESSED


def test_segments_read_only_by_conditions_and_foreach_count_as_covered(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: r
              emit: referral.updated
              foreach: OBR
              when: {present: NTE}
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            """,
            segments="strict: true",
        ),
    )
    result = normalise(mapset, MSH, ORC, "OBR|1", "NTE|1")
    assert "unmapped_segment" not in codes(result)


# ---- correlation, ordinals, provenance ------------------------------------------------


def test_an_event_without_any_correlation_key_fails_the_message(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: r
              emit: referral.updated
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
                correlate.filler_order: {path: ORC-3, as: identifier}
            """
        ),
    )
    assert normalise(mapset, MSH, "ORC|NW||F1").outcome is Outcome.PROCESSED
    result = normalise(mapset, MSH, "ORC|NW")
    assert result.outcome is Outcome.MAPPING_ERROR
    diag = only(result, "no_correlation_key")
    assert (diag.severity, diag.rule) == ("error", "r")
    nulled = normalise(mapset, MSH, 'ORC|NW|""|""')
    assert nulled.outcome is Outcome.MAPPING_ERROR
    assert "no_correlation_key" in codes(nulled)


def test_events_carry_type_rule_ordinal_mapping_and_digest(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: one
              emit: referral.updated
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
                patient.identifier: {path: "/PID-3[.5=MR]", as: identifier}
                specialty: {const: cardiology}
            - id: two
              emit: referral.sent
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
            """
        ),
    )
    result = normalise(mapset, MSH, PID, ORC)
    assert [(e.type, e.rule_id, e.ordinal) for e in result.events] == [
        (Event.REFERRAL_UPDATED, "one", 0),
        (Event.REFERRAL_SENT, "two", 1),
    ]
    assert result.mapping_id == "t.orders"
    assert result.mapping_digest == mapset.digest
    assert len(mapset.digest) == 16
    # occurred_at falls back to MSH-7 when the rule does not set it.
    assert result.events[1].fields["occurred_at"] == "2025-03-04T10:15:00-06:00"
    assert result.clues == {"patient": "12345^HOSP", "specialty": "cardiology"}


def test_digest_changes_with_any_file_of_the_set(tmp_path: Path) -> None:
    text = one_field("note", "NTE-3")
    first = load(tmp_path / "a", text)
    same = load(tmp_path / "b", text)
    other = load(tmp_path / "c", text.replace("NTE-3", "NTE-4"))
    assert first.digest == same.digest
    assert first.digest != other.digest


def test_occurred_at_from_msh7_without_offset_reports_timezone_assumed(tmp_path: Path) -> None:
    mapset = load(tmp_path, one_field("note", "NTE-3"))
    result = normalise(mapset, MSH.replace("20250304101500-0600", "20250304101500"), ORC)
    assert result.events[0].fields["occurred_at"] == "2025-03-04T10:15:00-06:00"
    assert "timezone_assumed" in codes(result)


def test_a_field_reading_msh7_keeps_its_timezone_assumed(tmp_path: Path) -> None:
    mapset = load(tmp_path, one_field("requested_at", "{path: /MSH-7, as: datetime}"))
    result = normalise(mapset, MSH.replace("20250304101500-0600", "20250304101500"), ORC)
    assert result.events[0].fields["requested_at"] == "2025-03-04T10:15:00-06:00"
    assert [(d.code, d.field) for d in result.diagnostics] == [("timezone_assumed", "requested_at")]


# ---- selection: overlays, no mapping, unparseable -------------------------------------

OVERLAY_RULE = """\
- id: r
  emit: referral.updated
  fields:
    correlate.placer_order: {path: ORC-2, as: identifier}
    status: {path: ORC-5, map: order_status, on_unmapped: passthrough}
"""


def test_overlay_mapping_is_tried_before_shared_and_its_tables_shadow(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(OVERLAY_RULE, mapping_id="shared.orders"),
        **{
            "sources/acme/orders.map.yaml": mapping(
                OVERLAY_RULE,
                mapping_id="acme.orders",
                match="message_type: ORM^O01, when: {path: MSH-3.1, equals: ACME}",
            ),
            "sources/acme/valuesets/order_status.yaml": """\
                schema: referral-valueset/v1
                id: order_status
                map: {CM: acme-completed}
                """,
            "sources/other/valuesets/unused.yaml": """\
                schema: referral-valueset/v1
                id: unused
                map: {A: b}
                """,
        },
    )
    assert mapset.overlays == frozenset({"acme", "other"})
    acme_msh = MSH.replace("|EHR|", "|ACME|")
    body = "ORC|NW|PLC1^EHR|||CM"

    own = normalise(mapset, acme_msh, body, overlay="acme")
    assert own.mapping_id == "acme.orders"
    assert own.events[0].fields["status"] == "acme-completed"

    # The overlay's match.when fails: the shared mapping runs, still with acme's tables.
    fallback = normalise(mapset, MSH, body, overlay="acme")
    assert fallback.mapping_id == "shared.orders"
    assert fallback.events[0].fields["status"] == "acme-completed"

    # Other sources (and no source) never see acme's mapping or tables.
    for overlay in (None, "other"):
        shared = normalise(mapset, acme_msh, body, overlay=overlay)
        assert shared.mapping_id == "shared.orders"
        assert shared.events[0].fields["status"] == "completed"


def test_overlay_table_replaces_the_shared_one_entirely(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(OVERLAY_RULE),
        **{
            "sources/acme/valuesets/order_status.yaml": """\
                schema: referral-valueset/v1
                id: order_status
                map: {CM: acme-completed}
                """,
        },
    )
    # IP is only in the shared table: with acme's table it is unmapped (passthrough).
    result = normalise(mapset, MSH, "ORC|NW|PLC1^EHR|||IP", overlay="acme")
    assert result.events[0].fields["status"] == "IP"
    assert only(result, "unmapped_code").severity == "warning"


def test_no_mapping_names_the_message_type_and_source(tmp_path: Path) -> None:
    mapset = load(tmp_path, one_field("note", "NTE-3").replace('"*"', "SIU^S12"))
    result = normalise(mapset, MSH, ORC, overlay="acme")
    assert result.outcome is Outcome.MAPPING_ERROR
    assert result.events == ()
    diag = only(result, "no_mapping")
    assert "ORM^O01" in diag.message
    assert "'acme'" in diag.message
    assert result.mapping_id == ""


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("PID|1||x\r", id="no-msh"),
        pytest.param("MSH\r", id="short-msh"),
        pytest.param("garbage", id="garbage"),
    ],
)
def test_unparseable_messages_are_mapping_errors(tmp_path: Path, text: str) -> None:
    mapset = load(tmp_path, one_field("note", "NTE-3"))
    result = mapset.normalise(text, received_at=RECEIVED)
    assert result.outcome is Outcome.MAPPING_ERROR
    assert codes(result) == ["unparseable"]


def test_message_type_lists_and_wildcards(tmp_path: Path) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: skip
              emit: ignore
            """,
            match="message_type: [ADT, SIU^S14]",
        ),
    )
    adt = normalise(mapset, MSH.replace("ORM^O01^ORM_O01", "ADT^A08"))
    assert (adt.outcome, adt.rule_id) == (Outcome.IGNORED, "skip")
    siu = normalise(mapset, MSH.replace("ORM^O01^ORM_O01", "SIU^S14"))
    assert siu.outcome is Outcome.IGNORED
    s12 = normalise(mapset, MSH.replace("ORM^O01^ORM_O01", "SIU^S12"))
    assert codes(s12) == ["no_mapping"]


# ---- properties -----------------------------------------------------------------------

PROPERTY_MAPPING = mapping(
    """\
    - id: skip_lab
      emit: ignore
      foreach: [ORC, OBR]
      when: {path: OBR-4.1, starts_with: LAB}
    - id: order
      emit: referral.created
      foreach: [ORC, OBR]
      when: {any: [{present: ORC-2}, {present: OBR-2}]}
      fields:
        correlate.placer_order:
          first_of:
            - {path: ORC-2, as: identifier}
            - {path: OBR-2, as: identifier}
        patient.identifier: {path: "/PID-3[.5=MR]", as: identifier, required: true}
        patient.name: {path: "/PID-5[1]", as: person_name}
        patient.birth_date: {path: /PID-7, as: date}
        status: {path: ORC-5, map: order_status, on_unmapped: warn}
        priority: {path: "ORC-7[1].6", map: priority, default: routine}
        requested_at: {path: ORC-9, as: datetime}
        service: {path: OBR-4, as: coding}
        note: {join: "NTE[*]-3", sep: "\\n"}
        reason: {concat: [OBR-31.1, OBR-31.2], sep: " "}
    """,
    defaults="timezone: America/Chicago, on_no_match: warn",
)

_PIECE = st.sampled_from(
    ["", '""', "A", "NW", "CA", "CM", "LAB1", "REF", "1980", "20250304", "x\\F\\y", "\\", "^", "&"]
)
_FIELD = st.lists(_PIECE, max_size=4).map("^".join)
_SEGMENT = st.tuples(
    st.sampled_from(["PID", "ORC", "OBR", "NTE", "OBX", "ZZZ", "PV1"]),
    st.lists(_FIELD | st.text(max_size=8), max_size=10),
).map(lambda t: "|".join([t[0], *t[1]]))
_MESSAGE = st.lists(_SEGMENT, max_size=8).map(lambda segs: "\r".join([MSH, *segs]) + "\r")


@pytest.fixture(scope="module")
def property_set(tmp_path_factory: pytest.TempPathFactory) -> MappingSet:
    return load(tmp_path_factory.mktemp("property"), PROPERTY_MAPPING)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_MESSAGE)
def test_normalising_twice_gives_the_same_result(property_set: MappingSet, text: str) -> None:
    first = property_set.normalise(text, received_at=RECEIVED)
    second = property_set.normalise(text, received_at=RECEIVED)
    assert first == second


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        _MESSAGE,
        st.text(max_size=200),
        st.text(alphabet='MSH|^~\\&\r\n ORCPID0123"', max_size=120),
        st.builds(lambda tail: MSH + tail, st.text(alphabet='|^~\\&\r\nORCPIDNTE1"', max_size=80)),
    )
)
def test_normalise_never_raises_on_any_text(property_set: MappingSet, text: str) -> None:
    result = property_set.normalise(text, received_at=RECEIVED)
    assert isinstance(result, Normalised)
    if result.outcome is not Outcome.PROCESSED:
        assert result.events == ()
    else:
        assert result.events


def test_an_instance_no_rule_reads_is_reported_beside_its_siblings_events(
    tmp_path: Path,
) -> None:
    mapset = load(
        tmp_path,
        mapping(
            """\
            - id: new
              emit: referral.created
              foreach: ORC
              when: {path: ORC-1, equals: NW}
              fields:
                correlate.placer_order: {path: ORC-2, as: identifier}
                patient.identifier: {path: /PID-3, as: identifier, required: true}
            """,
            defaults="timezone: America/Chicago, on_no_match: warn",
        ),
    )
    result = normalise(mapset, MSH, "PID|1||P1^^^H^MR", "ORC|NW|A", "ORC|SN|B")
    assert result.outcome is Outcome.PROCESSED
    assert [e.fields["correlate.placer_order"]["value"] for e in result.events] == ["A"]
    warning = only(result, "no_rule_matched")
    assert (warning.severity, warning.path) == ("warning", "ORC")
    assert "instance 2" in warning.message


def test_rules_that_fired_are_listed_even_when_the_message_fails(tmp_path: Path) -> None:
    mapset = load(tmp_path, one_field("note", "{path: NTE-3, required: true}"))
    result = normalise(mapset, MSH, ORC)
    assert result.outcome is Outcome.MAPPING_ERROR
    assert result.fired == ("r",)


def test_a_source_time_zone_applies_to_shared_mappings_reading_that_source(
    tmp_path: Path,
) -> None:
    mapset = load(
        tmp_path,
        one_field("requested_at", "{path: ORC-9, as: datetime}"),
        **{
            "sources/acme/source.yaml": (
                "schema: referral-source/v1\ntimezone: America/New_York\n"
            ),
        },
    )
    body = "ORC|NW|PLC1^EHR|||||||20250704101200"
    acme = normalise(mapset, MSH, body, overlay="acme")
    other = normalise(mapset, MSH, body)
    assert acme.events[0].fields["requested_at"] == "2025-07-04T10:12:00-04:00"
    assert other.events[0].fields["requested_at"] == "2025-07-04T10:12:00-05:00"
    assert only(acme, "timezone_assumed").message.endswith("America/New_York assumed")
    assert "acme" in mapset.overlays


def test_a_bad_source_settings_file_is_refused_with_its_position(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "hl7v2/x.map.yaml": one_field("note", "NTE-3"),
            "sources/acme/source.yaml": "schema: referral-source/v1\ntimezone: Mars/Base\n",
        },
    )
    with pytest.raises(MappingSetError) as caught:
        load_mapping_set(tmp_path)
    (error,) = caught.value.errors
    assert (Path(error.file).name, error.line, error.column) == ("source.yaml", 2, 11)
    assert "unknown time zone 'Mars/Base'" in error.message
