"""Bad mapping files are refused at the exact file:line:column, with a message that says
what was expected (and, for a misspelling, what was probably meant); a set with any bad
file loads nothing."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.domain.events import Outcome
from engine.mapping.mapset import MappingSet, MappingSetError, load_mapping_set
from engine.mapping.source import SourceError

# Line numbers in the tables below refer to this listing.
BASE = """\
schema: referral-mapping/v1
id: t.orders
match:
  message_type: ORM^O01
defaults:
  timezone: America/Chicago
  on_no_match: warn
segments:
  ignore: [PV1]
rules:
  - id: new_referral
    emit: referral.created
    foreach: ORC
    when: {path: ORC-1, equals: NW}
    fields:
      correlate.placer_order: {path: ORC-2, as: identifier}
      patient.identifier: {path: /PID-3, as: identifier, required: true}
      status: {path: ORC-5, map: order_status}
      note: NTE-3
      requested_at: {path: ORC-9, as: datetime}
"""
#        1         2         3         4         5
# 345678901234567890123456789012345678901234567890   (columns, for reading the tables)

ORDER_STATUS = """\
schema: referral-valueset/v1
id: order_status
map: {CM: completed}
"""

MAP = "hl7v2/x.map.yaml"
VS = "valuesets/order_status.yaml"


def write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def refused(root: Path, files: Mapping[str, str]) -> list[SourceError]:
    """Write ``files`` under ``root``; the set must not load; its errors."""
    write(root, files)
    with pytest.raises(MappingSetError) as caught:
        load_mapping_set(root)
    assert caught.value.errors, "a refused set says why"
    return list(caught.value.errors)


def located(root: Path, errors: list[SourceError]) -> list[tuple[str, int, int]]:
    return [(Path(e.file).relative_to(root).as_posix(), e.line, e.column) for e in errors]


def edited(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


def test_the_base_mapping_is_valid(tmp_path: Path) -> None:
    """Every error below comes from its one edit, not from the base."""
    write(tmp_path, {MAP: BASE, VS: ORDER_STATUS})
    mapset = load_mapping_set(tmp_path)
    assert [m.id for m in mapset.mappings] == ["t.orders"]
    assert [r.id for r in mapset.mappings[0].rules] == ["new_referral"]


BAD_EDITS = [
    # (id, old text, new text, line, column, message fragment)
    # -- unknown keys, with did-you-mean
    (
        "top-level-key",
        "id: t.orders",
        "id: t.orders\ntitel: Orders",
        3,
        1,
        "unknown key 'titel' (did you mean 'title'?); expected one of schema, id, title",
    ),
    (
        "defaults-key",
        "  on_no_match: warn",
        "  on_no_mach: warn",
        7,
        3,
        "unknown key 'on_no_mach' (did you mean 'on_no_match'?)",
    ),
    (
        "rule-key",
        "    foreach: ORC",
        "    forEach: ORC",
        13,
        5,
        "unknown key 'forEach' (did you mean 'foreach'?); expected one of id, emit, foreach",
    ),
    (
        "spec-key",
        "{path: ORC-5, map: order_status}",
        "{path: ORC-5, mapp: order_status}",
        18,
        29,
        "unknown key 'mapp' (did you mean 'map'?)",
    ),
    (
        "condition-key",
        "{path: ORC-1, equals: NW}",
        "{path: ORC-1, equal: NW}",
        14,
        25,
        "unknown key 'equal' (did you mean 'equals'?)",
    ),
    (
        "alternative-key",
        "requested_at: {path: ORC-9, as: datetime}",
        "requested_at: {first_of: [{when: {present: ORC-9}, valu: ORC-9.1}]}",
        20,
        58,
        "unknown key 'valu' (did you mean 'value'?); expected one of when, value",
    ),
    # -- value specs
    (
        "two-sources",
        "note: NTE-3",
        "note: {path: NTE-3, const: x}",
        19,
        13,
        "a value needs exactly one source: path, const, first_of, concat, join or count "
        "(found path, const)",
    ),
    ("no-source", "note: NTE-3", "note: {sep: x}", 19, 13, "(found none)"),
    (
        "sep-without-concat",
        "note: NTE-3",
        'note: {path: NTE-3, sep: ","}',
        19,
        32,
        "sep only goes with concat or join",
    ),
    (
        "map-on-typed-read",
        "{path: ORC-9, as: datetime}",
        "{path: ORC-9, as: datetime, map: order_status}",
        20,
        54,
        "map translates codes: use it on a plain (string) read",
    ),
    (
        "on-unmapped-without-map",
        "note: NTE-3",
        "note: {path: NTE-3, on_unmapped: warn}",
        19,
        40,
        "on_unmapped only goes with map",
    ),
    (
        "const-with-reader",
        "note: NTE-3",
        "note: {const: x, as: int}",
        19,
        21,
        "a const is text; typed readers (as:) read message paths",
    ),
    ("empty-first-of", "note: NTE-3", "note: {first_of: []}", 19, 24, "at least one alternative"),
    (
        "required-yes-is-not-a-flag",  # YAML 1.1 would have made this True
        "note: NTE-3",
        "note: {path: NTE-3, required: yes}",
        19,
        37,
        "required must be true or false",
    ),
    (
        "unknown-reader",
        "note: NTE-3",
        "note: {path: NTE-3, as: text}",
        19,
        31,
        "as must be one of string, int, decimal, date, datetime, identifier, coding, person_name",
    ),
    ("bad-on-null", "note: NTE-3", "note: {path: NTE-3, on_null: keep}", 19, 36, "clear, ignore"),
    (
        "unknown-transform",
        "note: NTE-3",
        "note: {path: NTE-3, transform: [trimm]}",
        19,
        39,
        "unknown transform 'trimm' (did you mean 'trim'?)",
    ),
    (
        "truncate-not-a-number",
        "note: NTE-3",
        "note: {path: NTE-3, transform: [{truncate: ten}]}",
        19,
        50,
        "truncate must be a whole number",
    ),
    (
        "tz-unknown-zone",
        "note: NTE-3",
        "note: {path: NTE-3, transform: [{tz: Mars/Base}]}",
        19,
        44,
        "unknown time zone 'Mars/Base'; use an IANA name",
    ),
    (
        "transform-two-keys",
        "note: NTE-3",
        "note: {path: NTE-3, transform: [{truncate: 2, tz: UTC}]}",
        19,
        39,
        "a transform with an argument is one key",
    ),
    # -- path grammar
    (
        "path-zero-field",
        "note: NTE-3",
        "note: NTE-0",
        19,
        13,
        "indices are 1-based; 0 is not a position in path 'NTE-0' (character 5)",
    ),
    (
        "path-zero-repetition",
        "note: NTE-3",
        'note: "PID-3[0].1"',
        19,
        13,
        "indices are 1-based; 0 is not a position in path 'PID-3[0].1' (character 7)",
    ),
    (
        "path-lower-case",
        "note: NTE-3",
        "note: pid-3",
        19,
        13,
        "a path starts with a three-character segment name like PID in path 'pid-3'",
    ),
    ("path-garbage", "note: NTE-3", "note: PID_3", 19, 13, "expected SEG[occ]-field[rep]"),
    (
        "star-in-plain-read",
        "note: NTE-3",
        'note: "NTE[*]-3"',
        19,
        13,
        "'NTE[*]-3' selects a list ([*]); only join, count and conditions over counts",
    ),
    (
        "star-in-present",
        "{path: ORC-1, equals: NW}",
        '{present: "NTE[*]-3"}',
        14,
        21,
        "selects a list ([*])",
    ),
    (
        "star-in-first-of",
        "note: NTE-3",
        'note: {first_of: ["OBX[*]-5"]}',
        19,
        25,
        "selects a list ([*])",
    ),
    (
        "composite-plain-read",
        "note: NTE-3",
        "note: ORC-2",
        19,
        13,
        "'ORC-2' is EI, a composite; a plain read needs a component (e.g. ORC-2.1) or a "
        "typed reader",
    ),
    (
        "composite-in-condition",
        "{path: ORC-1, equals: NW}",
        "{path: OBR-4, equals: CARD}",
        14,
        18,
        "'OBR-4' is CE, a composite",
    ),
    # -- events and fields
    (
        "unknown-event",
        "emit: referral.created",
        "emit: referal.created",
        12,
        11,
        "unknown event 'referal.created' (did you mean 'referral.created'?); expected a "
        "canonical event",
    ),
    (
        "unknown-field",
        "note: NTE-3",
        "notes: NTE-3",
        19,
        14,
        "referral.created has no field 'notes' (did you mean 'note'?)",
    ),
    (
        "datetime-read-as-string",
        "requested_at: {path: ORC-9, as: datetime}",
        "requested_at: ORC-9.1",
        20,
        21,
        "requested_at is a datetime; read it with `as: datetime` (this value gives string)",
    ),
    (
        "identifier-read-as-date",
        "correlate.placer_order: {path: ORC-2, as: identifier}",
        "correlate.placer_order: {path: ORC-9, as: date}",
        16,
        31,
        "correlate.placer_order is a identifier; read it with `as: identifier`",
    ),
    (
        "count-into-text",
        "note: NTE-3",
        'note: {count: "NTE[*]"}',
        19,
        13,
        "note is a text; read it with `as: string` (this value gives int)",
    ),
    (
        "catalogue-required-not-required",
        "as: identifier, required: true}",
        "as: identifier}",
        16,
        7,
        "referral.created requires 'patient.identifier': give it a spec with `required: true`",
    ),
    (
        "no-correlation-key",
        "correlate.placer_order:",
        "recipient.identifier:",
        16,
        7,
        "every event needs a correlation key: at least one of correlate.referral_id, "
        "correlate.placer_order",
    ),
    (
        "unknown-valueset",
        "map: order_status",
        "map: order_stat",
        18,
        34,
        "no value set 'order_stat' (did you mean 'order_status'?)",
    ),
    (
        "unknown-valueset-in-condition",
        "{path: ORC-1, equals: NW}",
        "{path: ORC-1, in_valueset: order_stat}",
        14,
        38,
        "no value set 'order_stat' (did you mean 'order_status'?)",
    ),
    # -- rules
    (
        "bad-foreach",
        "foreach: ORC",
        "foreach: orc",
        13,
        14,
        "foreach names the segment(s) that start each instance",
    ),
    (
        "unknown-field-set",
        "    foreach: ORC",
        "    foreach: ORC\n    use: [patient]",
        14,
        11,
        "no field set 'patient'",
    ),
    (
        "rule-id-format",
        "id: new_referral",
        "id: New",
        11,
        9,
        "a rule id is lower-case letters, digits",
    ),
    (
        "two-condition-heads",
        "{path: ORC-1, equals: NW}",
        "{present: ORC-1, absent: ORC-2}",
        14,
        11,
        "a condition starts with exactly one of present, absent, is_null, path, count, all, "
        "any, not (found present, absent)",
    ),
    (
        "count-without-op",
        "{path: ORC-1, equals: NW}",
        '{count: "NTE[*]"}',
        14,
        11,
        "count needs exactly one of eq, gte, lte, gt, lt",
    ),
    (
        "ignore-rule-with-fields",  # at the fields' first line: see the xfail at the end
        "emit: referral.created",
        "emit: ignore",
        16,
        7,
        "an ignore rule emits nothing, so it takes no fields",
    ),
    # -- file level
    (
        "duplicate-yaml-key",
        "      note: NTE-3",
        "      note: NTE-3\n      note: NTE-4",
        20,
        7,
        "duplicate key 'note' (first at line 19); YAML would keep only the last one",
    ),
    (
        "missing-timezone",
        "  timezone: America/Chicago\n",
        "",
        6,
        3,
        "defaults.timezone is required: the zone of timestamps sent without an offset",
    ),
    (
        "bad-timezone",
        "America/Chicago",
        "America/Chicgo",
        6,
        13,
        "unknown time zone 'America/Chicgo'; use an IANA name like America/Chicago",
    ),
    (
        "bad-on-no-match",
        "on_no_match: warn",
        "on_no_match: warning",
        7,
        16,
        "on_no_match must be one of ignore, warn, error (did you mean 'warn'?)",
    ),
    (
        "bad-rules-mode",
        "  on_no_match: warn",
        "  on_no_match: warn\n  rules: some",
        8,
        10,
        "rules must be one of all, first",
    ),
    (
        "bad-message-type",
        "message_type: ORM^O01",
        "message_type: ORM-O01",
        4,
        17,
        "a message type is MSH-9.1^MSH-9.2 like ORM^O01",
    ),
    ("bad-ignore-segment", "ignore: [PV1]", "ignore: [pv1]", 9, 12, "a segment name like PV1"),
    (
        "bad-strict",
        "  ignore: [PV1]",
        "  ignore: [PV1]\n  strict: maybe",
        10,
        11,
        "strict must be true or false",
    ),
    (
        "wrong-schema",
        "schema: referral-mapping/v1",
        "schema: referral-mapping/v2",
        1,
        9,
        "expected `schema: referral-mapping/v1` at the top",
    ),
    ("yaml-syntax", "  ignore: [PV1]", "  ignore: [PV1", 10, 6, "YAML syntax"),
]


@pytest.mark.parametrize(
    ("old", "new", "line", "column", "message"),
    [pytest.param(*row[1:], id=row[0]) for row in BAD_EDITS],
)
def test_bad_mapping_is_refused_at_the_spot(
    tmp_path: Path, old: str, new: str, line: int, column: int, message: str
) -> None:
    errors = refused(tmp_path, {MAP: edited(old, new), VS: ORDER_STATUS})
    assert located(tmp_path, errors) == [(MAP, line, column)], [e.message for e in errors]
    assert message in errors[0].message
    assert str(errors[0]).startswith(f"{tmp_path / MAP}:{line}:{column}: ")


def test_a_rule_that_reads_nothing_is_refused(tmp_path: Path) -> None:
    """A constant alone never makes an event (R8)."""
    errors = refused(
        tmp_path,
        {
            MAP: BASE
            + "  - id: constant\n"
            + "    emit: referral.updated\n"
            + "    fields:\n"
            + "      note: {const: hello}\n",
            VS: ORDER_STATUS,
        },
    )
    messages = {(e.line, e.column): e.message for e in errors}
    assert messages[(21, 5)] == (
        "a rule must read the message (a constant alone never makes an event)"
    )
    assert "every event needs a correlation key" in messages[(24, 7)]
    assert len(errors) == 2


def test_a_guarded_rule_may_set_only_constants(tmp_path: Path) -> None:
    """With a `when`, the rule reads the message, so constants are fine."""
    text = BASE.replace(
        "      note: NTE-3\n", "      note: NTE-3\n      priority: {const: routine}\n"
    )
    write(tmp_path, {MAP: text, VS: ORDER_STATUS})
    assert load_mapping_set(tmp_path).mappings[0].rules[0].id == "new_referral"


def test_duplicate_rule_ids_point_at_the_second(tmp_path: Path) -> None:
    errors = refused(
        tmp_path,
        {
            MAP: BASE
            + "  - id: new_referral\n"
            + "    emit: referral.updated\n"
            + "    fields:\n"
            + "      correlate.placer_order: {path: ORC-2, as: identifier}\n",
            VS: ORDER_STATUS,
        },
    )
    assert located(tmp_path, errors) == [(MAP, 21, 9)]
    assert errors[0].message == "rule id 'new_referral' is already used by rule 1"


@pytest.mark.parametrize(
    ("valueset", "line", "column", "message"),
    [
        pytest.param(
            "case_sensitive: false\nmap:\n  CM: completed\n  cm: complete\n",
            6,
            7,
            "code 'cm' collides with 'CM' (case_sensitive is false)",
            id="case-fold-collision",
        ),
        pytest.param(
            "case_sensitve: false\nmap: {CM: completed}\n",
            3,
            1,
            "unknown key 'case_sensitve' (did you mean 'case_sensitive'?)",
            id="unknown-key",
        ),
        pytest.param("map:\n  CM:\n", 4, 6, "the translation of 'CM' must be text", id="empty"),
        pytest.param(
            "on_unmapped: drop\nmap: {CM: x}\n", 3, 14, "error, warn, passthrough", id="policy"
        ),
        pytest.param("description: d\n", 1, 1, "a value set needs 'map'", id="no-map"),
    ],
)
def test_bad_value_sets_are_refused(
    tmp_path: Path, valueset: str, line: int, column: int, message: str
) -> None:
    text = "schema: referral-valueset/v1\nid: order_status\n" + valueset
    # The mapping uses the table, so it reports the missing table as well.
    errors = refused(tmp_path, {MAP: BASE, VS: text})
    assert located(tmp_path, errors) == [(VS, line, column), (MAP, 18, 34)]
    assert message in errors[0].message
    assert "no value set 'order_status'" in errors[1].message


def test_case_variants_are_distinct_codes_in_a_case_sensitive_set(tmp_path: Path) -> None:
    text = "schema: referral-valueset/v1\nid: order_status\nmap:\n  CM: completed\n  cm: other\n"
    write(tmp_path, {MAP: BASE, VS: text})
    table = load_mapping_set(tmp_path).tables(None)["order_status"]
    assert (table.lookup("CM"), table.lookup("cm"), table.lookup("Cm")) == (
        "completed",
        "other",
        None,
    )


def test_value_set_codes_and_translations_stay_text(tmp_path: Path) -> None:
    text = (
        "schema: referral-valueset/v1\nid: order_status\n"
        "map:\n  NO: norway\n  ON: 'off'\n  010: 1980-01-01\n  yes: NO\n"
    )
    write(tmp_path, {MAP: BASE, VS: text})
    table = load_mapping_set(tmp_path).tables(None)["order_status"]
    assert dict(table.entries) == {
        "NO": "norway",
        "ON": "off",
        "010": "1980-01-01",
        "yes": "NO",
    }


def test_duplicate_mapping_ids_across_files(tmp_path: Path) -> None:
    errors = refused(tmp_path, {MAP: BASE, "hl7v2/y.map.yaml": BASE, VS: ORDER_STATUS})
    assert located(tmp_path, errors) == [("hl7v2/y.map.yaml", 2, 5)]
    assert errors[0].message == f"mapping id 't.orders' is also used by {tmp_path / MAP}"


def test_an_overlay_mapping_may_not_reuse_a_shared_id(tmp_path: Path) -> None:
    errors = refused(tmp_path, {MAP: BASE, "sources/acme/x.map.yaml": BASE, VS: ORDER_STATUS})
    assert located(tmp_path, errors) == [("sources/acme/x.map.yaml", 2, 5)]


def test_duplicate_value_set_ids_in_one_scope(tmp_path: Path) -> None:
    errors = refused(tmp_path, {MAP: BASE, VS: ORDER_STATUS, "valuesets/again.yaml": ORDER_STATUS})
    assert located(tmp_path, errors) == [(VS, 2, 5)]
    assert "value set id 'order_status' is also in" in errors[0].message


def test_an_overlay_value_set_does_not_serve_shared_mappings(tmp_path: Path) -> None:
    errors = refused(
        tmp_path, {MAP: BASE, "sources/acme/valuesets/order_status.yaml": ORDER_STATUS}
    )
    assert located(tmp_path, errors) == [(MAP, 18, 34)]


@pytest.mark.parametrize(
    "name",
    ["hl7v2/notes.yaml", "README.yaml", "sources/acme/extra.yml"],
)
def test_yaml_that_is_neither_mapping_value_set_nor_cases(tmp_path: Path, name: str) -> None:
    errors = refused(tmp_path, {MAP: BASE, VS: ORDER_STATUS, name: "a: b\n"})
    assert located(tmp_path, errors) == [(name, 1, 1)]
    assert errors[0].message.startswith(
        "not part of a mapping set: name mappings *.map.yaml, fixtures *.cases.yaml"
    )


def test_schema_samples_and_hidden_folders_are_not_loaded(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            MAP: BASE,
            VS: ORDER_STATUS,
            "_schema/whatever.yaml": "not: loaded\n",
            "hl7v2/samples/a.yaml": "x: 1\n",
            ".git/config.yaml": "x: 1\n",
            "hl7v2/tests/broken.cases.yaml": "cases: [\n",  # fixtures are not the set
        },
    )
    assert [m.id for m in load_mapping_set(tmp_path).mappings] == ["t.orders"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "expected `schema: referral-mapping/v1` at the top", id="empty"),
        pytest.param("- a\n", "expected `schema: referral-mapping/v1` at the top", id="list"),
        pytest.param("schema: referral-mapping/v1\n", "a mapping needs 'id'", id="only-schema"),
    ],
)
def test_files_without_a_mapping_are_refused(tmp_path: Path, text: str, message: str) -> None:
    errors = refused(tmp_path, {MAP: text})
    assert located(tmp_path, errors) == [(MAP, 1, 1)]
    assert errors[0].message == message


def test_value_set_with_the_mapping_schema(tmp_path: Path) -> None:
    errors = refused(
        tmp_path, {MAP: BASE, VS: ORDER_STATUS.replace("referral-valueset", "referral-mapping")}
    )
    assert located(tmp_path, errors)[0] == (VS, 1, 9)
    assert errors[0].message == "expected `schema: referral-valueset/v1` at the top"


def test_every_error_in_the_set_is_reported(tmp_path: Path) -> None:
    two_bad_rules = (
        edited("emit: referral.created", "emit: referal.created")
        + "  - id: second\n"
        + "    emit: referral.updated\n"
        + "    fields:\n"
        + "      correlate.placer_order: {path: ORC-2, as: identifier}\n"
        + "      note: NTE-0\n"
        + "      reason: {path: NTE-3, as: datetime}\n"
    )
    errors = refused(
        tmp_path,
        {
            MAP: two_bad_rules,
            "hl7v2/y.map.yaml": edited("id: t.orders", "id: t.other").replace(
                "America/Chicago", "Nowhere/City"
            ),
            "hl7v2/z.map.yaml": "schema: [\n",
            VS: ORDER_STATUS,
            "valuesets/more.yaml": "schema: referral-valueset/v1\nid: more\n"
            "case_sensitive: false\nmap: {a: x, A: y}\n",
        },
    )
    assert sorted(located(tmp_path, errors)) == [
        (MAP, 12, 11),  # unknown event in rule 1
        (MAP, 25, 13),  # NTE-0 in rule 2
        (MAP, 26, 15),  # reason is text, read as datetime, in rule 2
        ("hl7v2/y.map.yaml", 6, 13),  # bad time zone
        ("hl7v2/z.map.yaml", 2, 1),  # YAML syntax
        ("valuesets/more.yaml", 4, 16),  # case-fold collision
    ]


def test_one_bad_file_refuses_the_whole_set(tmp_path: Path) -> None:
    write(tmp_path, {MAP: BASE, VS: ORDER_STATUS})
    good: MappingSet = load_mapping_set(tmp_path)
    write(tmp_path, {"hl7v2/y.map.yaml": edited("id: t.orders", "id: t.bad").replace("NW", "")})
    with pytest.raises(MappingSetError) as caught:
        load_mapping_set(tmp_path)
    # Only the bad file is blamed; the good one is not loaded on its own either.
    assert {Path(e.file).name for e in caught.value.errors} == {"y.map.yaml"}
    assert str(caught.value).startswith(f"{tmp_path / 'hl7v2/y.map.yaml'}:14:")
    # What was loaded before still works: a set is a value, not shared state.
    msg = (
        "MSH|^~\\&|A|B|C|D|20250101||ORM^O01|1|P|2.5.1\r"
        "PID|1||1^^^H^MR\rORC|NW|P1^X|||CM\rNTE|1||n\r"
    )
    result = good.normalise(msg, received_at=datetime(2025, 1, 1, tzinfo=UTC))
    assert result.outcome is Outcome.PROCESSED


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MappingSetError) as caught:
        load_mapping_set(tmp_path / "nope")
    (error,) = caught.value.errors
    assert (error.line, error.column, error.message) == (1, 1, "no such mappings directory")


# ---- engine bugs found while writing these tests ------------------------------------


def test_unknown_key_with_a_block_value_points_at_the_key(tmp_path: Path) -> None:
    errors = refused(tmp_path, {MAP: edited("    fields:\n", "    feilds:\n"), VS: ORDER_STATUS})
    assert located(tmp_path, errors) == [(MAP, 15, 5)]


def test_a_default_must_fit_the_field_type(tmp_path: Path) -> None:
    text = edited(
        "requested_at: {path: ORC-9, as: datetime}",
        "requested_at: {path: ORC-9, as: datetime, default: soon}",
    )
    refused(tmp_path, {MAP: text, VS: ORDER_STATUS})


def test_concat_never_drops_a_typed_part_silently(tmp_path: Path) -> None:
    text = edited("note: NTE-3", "note: {concat: [{path: NTE-2, as: int}, NTE-3], sep: ' '}")
    write(tmp_path, {MAP: text, VS: ORDER_STATUS})
    try:
        mapset = load_mapping_set(tmp_path)
    except MappingSetError:
        return  # refused at load: fine
    msg = (
        "MSH|^~\\&|A|B|C|D|20250101||ORM^O01|1|P|2.5.1\r"
        "PID|1||1^^^H^MR\rORC|NW|P1^X|||CM\rNTE|1|30|minutes\r"
    )
    result = mapset.normalise(msg, received_at=datetime(2025, 1, 1, tzinfo=UTC))
    assert result.events[0].fields["note"] == "30 minutes"


def test_a_non_text_field_set_name_is_an_error_not_a_crash(tmp_path: Path) -> None:
    errors = refused(
        tmp_path,
        {MAP: edited("    foreach: ORC", "    foreach: ORC\n    use: [{a: b}]"), VS: ORDER_STATUS},
    )
    assert located(tmp_path, errors) == [(MAP, 14, 11)]


def test_replace_to_must_be_text(tmp_path: Path) -> None:
    text = edited("note: NTE-3", "note: {path: NTE-3, transform: [{replace: {from: a, to: [b]}}]}")
    write(tmp_path, {MAP: text, VS: ORDER_STATUS})
    try:
        mapset = load_mapping_set(tmp_path)
    except MappingSetError:
        return
    msg = (
        "MSH|^~\\&|A|B|C|D|20250101||ORM^O01|1|P|2.5.1\rPID|1||1^^^H^MR\rORC|NW|P1^X\rNTE|1||abc\r"
    )
    mapset.normalise(msg, received_at=datetime(2025, 1, 1, tzinfo=UTC))  # must not raise


def test_truncate_must_not_be_negative(tmp_path: Path) -> None:
    text = edited("note: NTE-3", "note: {path: NTE-3, transform: [{truncate: -2}]}")
    refused(tmp_path, {MAP: text, VS: ORDER_STATUS})
