"""The analysts' fixture runner (``*.cases.yaml``): want/got lines, error expectations,
strict diagnostics, sample files and batches, and bad fixture files located by line."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from engine.domain.events import Outcome
from engine.mapping.fixtures import CaseResult, Run, case_files, read_messages, run_cases
from engine.mapping.mapset import MappingSet, load_mapping_set

ORDERS = """\
schema: referral-mapping/v1
id: t.orders
match: {message_type: ORM^O01}
defaults: {timezone: America/Chicago, on_no_match: warn}
segments: {ignore: [PV1]}
rules:
  - id: new_referral
    emit: referral.created
    foreach: ORC
    when: {path: ORC-1, equals: NW}
    fields:
      correlate.placer_order: {path: ORC-2, as: identifier}
      patient.identifier: {path: "/PID-3[.5=MR]", as: identifier, required: true}
      priority: {path: "ORC-7[1].6", map: priority, default: routine}
      note: NTE-3
      requested_at: {path: ORC-9, as: datetime}
  - id: cancel
    emit: referral.cancelled
    foreach: ORC
    when: {path: ORC-1, equals: CA}
    fields:
      correlate.placer_order: {path: ORC-2, as: identifier}
"""

NOT_REFERRAL = """\
schema: referral-mapping/v1
id: t.not_referral
match: {message_type: ADT}
defaults: {timezone: UTC}
rules:
  - id: adt
    emit: ignore
"""

PRIORITY = """\
schema: referral-valueset/v1
id: priority
on_unmapped: warn
map: {S: stat, R: routine}
"""

MSH = "MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20250304101500-0600||ORM^O01^ORM_O01|{id}|P|2.5.1"
NEW = [
    MSH.format(id="C1"),
    "PID|1||123^^^HOSP^MR||DOE^JANE",
    "ORC|NW|REF-1^EHR|||||^^^^^S||20250304101200-0600",
    "NTE|1||see soon",
]


def write(root: Path, files: Mapping[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content), encoding="utf-8")


def mapset(root: Path) -> MappingSet:
    write(
        root,
        {
            "hl7v2/orders.map.yaml": ORDERS,
            "hl7v2/not_referral.map.yaml": NOT_REFERRAL,
            "valuesets/priority.yaml": PRIORITY,
        },
    )
    return load_mapping_set(root)


def run(root: Path, cases: str, *, name: str = "hl7v2/tests/t.cases.yaml", k: str = "") -> Run:
    loaded = mapset(root)
    write(root, {name: cases})
    return run_cases(loaded, [root / name], name_filter=k)


def block(segments: list[str], indent: int = 6) -> str:
    """An inline ``message: |`` body at ``indent`` spaces."""
    return "\n".join(" " * indent + s for s in segments)


def case(
    expect: str,
    segments: list[str] = NEW,
    name: str = "new referral",
    mapping: str = "t.orders",
) -> str:
    return (
        f"mapping: {mapping}\ncases:\n"
        f"  - name: {name}\n    message: |\n{block(segments)}\n"
        f"    expect:\n{textwrap.indent(textwrap.dedent(expect), '      ')}"
    )


def one(result: Run) -> CaseResult:
    (only,) = result.results
    return only


# ---- passing and failing cases ------------------------------------------------------


def test_a_passing_case_reports_ok_with_file_and_line(tmp_path: Path) -> None:
    got = one(
        run(
            tmp_path,
            case("""\
                events:
                  - emit: referral.created
                    rule: new_referral
                    fields:
                      correlate.placer_order: {value: REF-1, namespace: EHR}
                      patient.identifier: {value: "123", namespace: HOSP, type: MR}
                      priority: stat
                      note: see soon
                      requested_at: "2025-03-04T10:12:00-06:00"
                diagnostics: []
                """),
        )
    )
    assert got.ok, got.report()
    assert got.problems == []
    assert got.line == 3
    assert got.report() == f"ok   {tmp_path / 'hl7v2/tests/t.cases.yaml'}:3 > new referral"
    assert got.result is not None
    assert got.result.outcome is Outcome.PROCESSED


def test_a_failing_field_prints_a_want_got_line_with_the_rule(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        case("""\
            events:
              - emit: referral.created
                fields:
                  priority: routine
                  note: see soon
                  patient.identifier: {value: "123", namespace: OTHER, type: MR}
                  patient.name: {family: DOE}
            """),
    )
    got = one(result)
    assert not got.ok
    assert got.problems == [
        'events[0].fields.priority  -want "routine"  +got "stat"  (rule new_referral)',
        "events[0].fields.patient.identifier  "
        '-want {"value": "123", "namespace": "OTHER", "type": "MR"}  '
        '+got {"value": "123", "namespace": "HOSP", "type": "MR"}  (rule new_referral)',
        'events[0].fields.patient.name  -want {"family": "DOE"}  +got nothing  (rule new_referral)',
    ]
    assert got.report().splitlines()[0] == (
        f"FAIL {tmp_path / 'hl7v2/tests/t.cases.yaml'}:3 > new referral"
    )
    assert got.report().splitlines()[1] == "  " + got.problems[0]
    assert result.failed == [got]


def test_event_list_mismatches(tmp_path: Path) -> None:
    two_orders = [*NEW[:3], "ORC|CA|REF-2^EHR", "ORC|CA|REF-3^EHR"]
    got = one(
        run(
            tmp_path,
            case(
                """\
                events:
                  - emit: referral.created
                    rule: cancel
                  - emit: referral.updated
                """,
                two_orders,
            ),
        )
    )
    assert got.problems == [
        "events[0].rule  -want 'cancel'  +got 'new_referral'",
        "events[1].emit  -want 'referral.updated'  +got 'referral.cancelled'",
        "events[2]  +got 'referral.cancelled' (rule cancel) not expected",
    ]
    short = one(
        run(
            tmp_path,
            case(
                "events:\n  - emit: referral.created\n  - emit: referral.cancelled\n",
                NEW[:3],
            ),
        )
    )
    assert short.problems == ["events[1]  -want 'referral.cancelled'  +got nothing"]


def test_listed_fields_only_are_compared_and_scalars_as_text(tmp_path: Path) -> None:
    """Unlisted fields are not compared; YAML scalars compare as the canonical text."""
    got = one(
        run(
            tmp_path,
            case(
                """\
                events:
                  - emit: referral.created
                    fields:
                      patient.identifier: {value: 123, namespace: HOSP, type: MR}
                      note: {clear: true}
                """,
                [*NEW[:3], 'NTE|1||""'],
            ),
        )
    )
    assert got.ok, got.report()


NO_MRN = [NEW[0], "PID|1||123^^^HOSP^SS", NEW[2]]  # the patient's only id is an SSN


def test_outcome_mismatch_lists_the_errors(tmp_path: Path) -> None:
    got = one(run(tmp_path, case("events:\n  - emit: referral.created\n", NO_MRN)))
    assert got.problems[0] == "outcome  -want 'processed'  +got 'mapping_error'"
    assert got.problems[1].startswith("  error required_value_missing: ")
    assert got.problems[1].endswith(
        "(rule new_referral, field patient.identifier, path /PID-3[.5=MR])"
    )
    assert got.problems[-1] == "events[0]  -want 'referral.created'  +got nothing"


# ---- error: expectations -------------------------------------------------------------


@pytest.mark.parametrize(
    "expect",
    [
        pytest.param("error: required_value_missing\n", id="code-only"),
        pytest.param(
            "error: {code: required_value_missing, rule: new_referral, "
            'field: patient.identifier, path: "/PID-3[.5=MR]"}\n',
            id="full",
        ),
        pytest.param(
            "outcome: mapping_error\nerror: {code: required_value_missing}\n", id="outcome"
        ),
    ],
)
def test_expected_errors_pass(tmp_path: Path, expect: str) -> None:
    got = one(run(tmp_path, case(expect, NO_MRN)))
    assert got.ok, got.report()


def test_a_wrong_error_expectation_shows_what_came(tmp_path: Path) -> None:
    got = one(run(tmp_path, case("error: {code: unmapped_code, field: priority}\n", NO_MRN)))
    (problem,) = got.problems
    assert problem.startswith(
        'error  -want {"code": "unmapped_code", "field": "priority"}  '
        "+got error required_value_missing: "
    )


def test_an_error_expected_but_none_came(tmp_path: Path) -> None:
    got = one(run(tmp_path, case("error: required_value_missing\n")))
    assert got.problems == [
        "outcome  -want 'mapping_error'  +got 'processed'",
        'error  -want {"code": "required_value_missing"}  +got no error',
    ]


ADT = ["MSH|^~\\&|A|B|C|D|20250101||ADT^A08|X|P|2.5", "PID|1||1"]


def test_ignored_messages_are_expected_by_rule(tmp_path: Path) -> None:
    assert one(run(tmp_path, case("rule: adt\n", ADT, mapping="t.not_referral"))).ok
    wrong = one(run(tmp_path, case("rule: other\n", ADT, mapping="t.not_referral")))
    assert wrong.problems == ["rule  -want 'other'  +got 'adt'"]
    processed = one(run(tmp_path, case("rule: adt\n")))
    assert processed.problems[0] == "outcome  -want 'ignored'  +got 'processed'"
    assert processed.problems[-1] == "rule  -want 'adt'  +got None"


def test_the_mapping_named_by_the_file_is_checked(tmp_path: Path) -> None:
    got = one(run(tmp_path, case("rule: adt\n", ADT, mapping="t.orders")))
    assert got.problems == ["mapping  -want 't.orders'  +got 't.not_referral'"]


# ---- diagnostics ----------------------------------------------------------------------


def test_empty_diagnostics_means_no_warnings_or_errors(tmp_path: Path) -> None:
    unknown_priority = [NEW[0], NEW[1], "ORC|NW|REF-1^EHR|||||^^^^^X||20250304101200", "ZPI|1"]
    got = one(run(tmp_path, case("diagnostics: []\n", unknown_priority)))
    assert got.problems == [
        "diagnostics  +got warning unmapped_code: code 'X' is not in value set 'priority' "
        f"({tmp_path / 'valuesets/priority.yaml'}) "
        "(rule new_referral, field priority, path ORC-7[1].6)",
        "diagnostics  +got warning unmapped_segment: 1 ZPI segment(s) neither read nor listed "
        "in segments.ignore (path ZPI)",
    ]
    # Notes (timezone_assumed here) are not held against a case that lists none.
    assert got.result is not None
    assert "timezone_assumed" in {d.code for d in got.result.diagnostics}


def test_listed_diagnostics_match_by_the_keys_given(tmp_path: Path) -> None:
    unknown_priority = [NEW[0], NEW[1], "ORC|NW|REF-1^EHR|||||^^^^^X||20250304101200", "ZPI|1"]
    ok = one(
        run(
            tmp_path,
            case(
                """\
                diagnostics:
                  - {code: unmapped_code, severity: warning, field: priority}
                  - unmapped_segment
                  - {code: timezone_assumed, path: ORC-9}
                """,
                unknown_priority,
            ),
        )
    )
    assert ok.ok, ok.report()
    missing = one(
        run(
            tmp_path,
            case(
                """\
                diagnostics:
                  - unmapped_code
                  - unmapped_segment
                  - {code: default_used, field: note}
                """,
                unknown_priority,
            ),
        )
    )
    assert missing.problems == [
        'diagnostics  -want {"code": "default_used", "field": "note"}  +got nothing like it'
    ]


# ---- file: + index: samples -----------------------------------------------------------


def _message(control: str, order: str) -> list[str]:
    return [MSH.format(id=control), NEW[1], f"ORC|NW|{order}^EHR|||||||20250304101200-0600"]


def _sample_case(file: str, index: int | None, order: str) -> str:
    index_line = f"    index: {index}\n" if index is not None else ""
    return (
        "cases:\n"
        f"  - name: from {file}\n"
        f"    file: ../samples/{file}\n{index_line}"
        "    expect:\n"
        "      events:\n"
        "        - emit: referral.created\n"
        f"          fields: {{correlate.placer_order: {{value: {order}, namespace: EHR}}}}\n"
    )


SAMPLES: dict[str, bytes] = {
    "lf.hl7": ("\n".join(_message("A", "ORD-A") + _message("B", "ORD-B")) + "\n").encode(),
    "crlf.hl7": ("\r\n".join(_message("A", "ORD-A") + _message("B", "ORD-B")) + "\r\n").encode(),
    "cr.hl7": ("\r".join(_message("A", "ORD-A") + _message("B", "ORD-B")) + "\r").encode(),
    "batch.hl7": (
        "\r\n".join(
            [
                "FHS|^~\\&|EHR|CLINIC|REFLOOP|HUB|20250304",
                "BHS|^~\\&|EHR|CLINIC|REFLOOP|HUB|20250304",
                *_message("A", "ORD-A"),
                *_message("B", "ORD-B"),
                "BTS|2",
                "FTS|1",
            ]
        )
        + "\r\n"
    ).encode(),
    "bom.hl7": b"\xef\xbb\xbf"
    + ("\n".join(_message("A", "ORD-A") + _message("B", "ORD-B")) + "\n").encode(),
    "blank-lines.hl7": (
        "\r\n".join(_message("A", "ORD-A")) + "\r\n\r\n\n" + "\n".join(_message("B", "ORD-B"))
    ).encode(),
}


@pytest.mark.parametrize("sample", sorted(SAMPLES))
@pytest.mark.parametrize(
    ("index", "order"), [pytest.param(None, "ORD-A", id="default"), (1, "ORD-A"), (2, "ORD-B")]
)
def test_sample_files_by_index(tmp_path: Path, sample: str, index: int | None, order: str) -> None:
    write(tmp_path, {f"hl7v2/samples/{sample}": SAMPLES[sample]})
    got = one(run(tmp_path, _sample_case(sample, index, order)))
    assert got.ok, got.report()


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_read_messages_splits_and_normalises_terminators(tmp_path: Path, sample: str) -> None:
    path = tmp_path / sample
    path.write_bytes(SAMPLES[sample])
    messages = read_messages(path)
    assert len(messages) == 2
    assert [m.split("\r")[0].split("|")[9] for m in messages] == ["A", "B"]
    for text in messages:
        assert text.startswith("MSH|")
        assert text.endswith("\r")
        assert "\n" not in text
        assert "FHS" not in text
        assert "BTS" not in text
        assert text.count("\r") == 3


def test_read_messages_decodes_per_msh18(tmp_path: Path) -> None:
    path = tmp_path / "latin1.hl7"
    msh = "MSH|^~\\&|A|B|C|D|20250101||ORM^O01|X|P|2.5.1||||||8859/1"
    path.write_bytes((msh + "\rPID|1||1||MÜLLER^JOSÉ\r").encode("latin-1"))
    (text,) = read_messages(path)
    assert "MÜLLER^JOSÉ" in text


def test_sample_index_out_of_range_and_missing_file(tmp_path: Path) -> None:
    write(tmp_path, {"hl7v2/samples/lf.hl7": SAMPLES["lf.hl7"]})
    cases = _sample_case("lf.hl7", 3, "ORD-A") + _sample_case("nope.hl7", None, "X").replace(
        "cases:\n", ""
    )
    out_of_range, missing = run(tmp_path, cases).results
    fixture = tmp_path / "hl7v2/tests/t.cases.yaml"
    assert out_of_range.problems == [f"{fixture}:4:12: lf.hl7 holds 2 message(s)"]
    assert out_of_range.line == 4
    assert missing.problems == [
        f"{fixture}:10:11: no such sample file: {fixture.parent / '../samples/nope.hl7'}"
    ]


# ---- bad fixture files ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        pytest.param(
            "cases:\n  - name: a\n    mesage: x\n    expect: {events: []}\n",
            3,
            ":3:5: unknown key 'mesage'; expected one of name, message, file, index, overlay, "
            "expect",
            id="case-key",
        ),
        pytest.param(
            f"cases:\n  - name: a\n    message: |\n{block(NEW)}\n    expect: {{event: []}}\n",
            8,
            ":8:14: unknown key 'event'; expected one of outcome, rule, events, diagnostics, error",
            id="expect-key",
        ),
        pytest.param(
            "cases:\n  - name: a\n    expect: {events: []}\n",
            2,
            ":2:5: a case needs `message:` (inline) or `file:` (a sample)",
            id="no-message",
        ),
        pytest.param(
            f"cases:\n  - name: a\n    message: |\n{block(NEW)}\n",
            2,
            ":2:5: a case needs `expect:` (events, rule, or error)",
            id="no-expect",
        ),
        pytest.param("cases:\n  - just text\n", 2, ":2:5: a case is a mapping", id="not-a-map"),
    ],
)
def test_bad_cases_are_located(tmp_path: Path, text: str, line: int, problem: str) -> None:
    got = one(run(tmp_path, text))
    fixture = tmp_path / "hl7v2/tests/t.cases.yaml"
    assert got.line == line
    assert len(got.problems) == 1
    assert got.problems[0].startswith(str(fixture) + problem)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        pytest.param("mapping: x\n", 1, "a fixtures file needs `cases:`", id="no-cases"),
        pytest.param("cases: [\n", 2, "YAML syntax", id="syntax"),
        pytest.param("cases: []\ncases: []\n", 2, "duplicate key 'cases'", id="duplicate"),
        pytest.param(
            "context: {received_at: yesterday}\ncases: []\n",
            1,
            "received_at is ISO 8601",
            id="received-at",
        ),
    ],
)
def test_bad_fixture_files_are_one_failed_result(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    got = one(run(tmp_path, text))
    assert got.name == "(file)"
    assert (Path(got.file), got.line) == (tmp_path / "hl7v2/tests/t.cases.yaml", line)
    assert not got.ok
    assert message in got.problems[0]


def test_a_bad_case_does_not_stop_the_others(tmp_path: Path) -> None:
    text = case("events: [{emit: referral.created}]\n", name="good") + (
        "  - name: bad\n    mesage: x\n    expect: {}\n"
    )
    good, bad = run(tmp_path, text).results
    assert good.ok
    assert not bad.ok


# ---- the run ---------------------------------------------------------------------------


def test_fired_rules_are_tracked_per_mapping(tmp_path: Path) -> None:
    text = (
        "cases:\n"
        f"  - name: adt\n    message: |\n{block(ADT)}\n    expect: {{rule: adt}}\n"
        f"  - name: order\n    message: |\n{block(NEW)}\n"
        "    expect: {events: [{emit: referral.created}]}\n"
    )
    result = run(tmp_path, text)
    assert all(r.ok for r in result.results)
    assert result.fired == {"t.orders": {"new_referral"}, "t.not_referral": {"adt"}}


def test_name_filter_selects_cases(tmp_path: Path) -> None:
    text = case("events: [{emit: referral.created}]\n", name="First one") + (
        f"  - name: second\n    message: |\n{block(NEW)}\n    expect: {{rule: nope}}\n"
    )
    result = run(tmp_path, text, k="FIRST")
    assert [r.name for r in result.results] == ["First one"]


def test_case_files_are_found_in_shared_and_overlay_folders(tmp_path: Path) -> None:
    mapset(tmp_path)
    write(
        tmp_path,
        {
            "hl7v2/tests/a.cases.yaml": "cases: []\n",
            "sources/acme/tests/b.cases.yaml": "cases: []\n",
            "hl7v2/samples/c.cases.yaml": "cases: []\n",  # samples are skipped
        },
    )
    assert [p.relative_to(tmp_path).as_posix() for p in case_files(tmp_path)] == [
        "hl7v2/tests/a.cases.yaml",
        "sources/acme/tests/b.cases.yaml",
    ]


def test_overlay_fixtures_run_for_their_source(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "sources/acme/valuesets/priority.yaml": PRIORITY.replace("S: stat", "S: acme-stat"),
            "sources/acme/tests/t.cases.yaml": case(
                "events: [{emit: referral.created, fields: {priority: acme-stat}}]\n"
            ),
            "hl7v2/tests/t.cases.yaml": case(
                "events: [{emit: referral.created, fields: {priority: stat}}]\n"
            ),
            "hl7v2/tests/o.cases.yaml": "overlay: acme\n"
            + case("events: [{emit: referral.created, fields: {priority: acme-stat}}]\n"),
        },
    )
    loaded = mapset(tmp_path)
    result = run_cases(loaded, case_files(tmp_path))
    assert [r.ok for r in result.results] == [True, True, True], [
        r.report() for r in result.results
    ]


def test_an_unknown_top_level_fixture_key_is_reported(tmp_path: Path) -> None:
    got = one(run(tmp_path, "mapping: x\ncases: []\nextra: 1\n"))
    assert (got.line, got.ok) == (3, False)
    assert "unknown key 'extra'" in got.problems[0]


@pytest.mark.parametrize(
    "expect",
    [
        pytest.param("events: [referral.created]\n", id="event-not-a-mapping"),
        pytest.param("events: none\n", id="events-not-a-list"),
        pytest.param(
            "events:\n  - emit: referral.created\n    fields: [priority]\n",
            id="fields-not-a-mapping",
        ),
        pytest.param(
            "diagnostics: [{code: timezone_assumed, sevrity: info}]\n",
            id="unknown-diagnostic-key",
        ),
    ],
)
def test_malformed_expectations_are_a_failed_case(tmp_path: Path, expect: str) -> None:
    naive = [NEW[0], NEW[1], "ORC|NW|REF-1^EHR|||||||20250304101200"]
    got = one(run(tmp_path, case(expect, naive)))
    assert not got.ok
    assert got.problems[0].startswith(f"{tmp_path / 'hl7v2/tests/t.cases.yaml'}:")


def test_a_non_numeric_sample_index_is_a_failed_case(tmp_path: Path) -> None:
    write(tmp_path, {"hl7v2/samples/lf.hl7": SAMPLES["lf.hl7"]})
    got = one(
        run(
            tmp_path,
            _sample_case("lf.hl7", None, "ORD-A").replace(
                "    expect", "    index: two\n    expect"
            ),
        )
    )
    assert got.problems == [f"{tmp_path / 'hl7v2/tests/t.cases.yaml'}:4:12: index is a number"]


def test_expecting_no_events_does_not_pass_a_mapping_error(tmp_path: Path) -> None:
    got = one(run(tmp_path, case("events: []\n", ["garbage"])))
    assert got.result is not None
    assert got.result.outcome is Outcome.MAPPING_ERROR
    assert not got.ok
