"""``refloop mappings check|test|schema`` run as the real console script on temp dirs:
exit codes, ``file:line:col: error: ...`` lines and the summaries an analyst reads."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from engine.edges.cli import main
from engine.mapping.schema import SCHEMAS, render
from engine.outbound.schema import SCHEMAS as OUTBOUND_SCHEMAS
from engine.outbound.schema import render as render_outbound
from engine.policy.schema import SCHEMAS as POLICY_SCHEMAS
from engine.policy.schema import render as render_policy
from tests.helpers import REFLOOP

# TODO: drop the fallback once engine/edges/cli.py registers the group
# (`main.add_command(mappings)`); until then the group is run through its own entry point.
if "mappings" in main.commands:
    COMMAND = [str(REFLOOP), "mappings"]
else:
    COMMAND = [
        sys.executable,
        "-c",
        "from engine.edges.cli_mappings import mappings; mappings()",
    ]

MAPPING = """\
schema: referral-mapping/v1
id: t.orders
match: {message_type: ORM^O01}
defaults: {timezone: America/Chicago, on_no_match: warn}
rules:
  - id: new_referral
    emit: referral.created
    foreach: ORC
    when: {path: ORC-1, equals: NW}
    fields:
      correlate.placer_order: {path: ORC-2, as: identifier}
      patient.identifier: {path: "/PID-3[.5=MR]", as: identifier, required: true}
      priority: {path: "ORC-7[1].6", map: priority, default: routine}
  - id: cancel
    emit: referral.cancelled
    foreach: ORC
    when: {path: ORC-1, equals: CA}
    fields:
      correlate.placer_order: {path: ORC-2, as: identifier}
"""

PRIORITY = """\
schema: referral-valueset/v1
id: priority
on_unmapped: warn
map: {S: stat, R: routine}
"""

CASES = """\
mapping: t.orders
cases:
  - name: urgent referral
    message: |
      MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20250304101500-0600||ORM^O01|C1|P|2.5.1
      PID|1||123^^^HOSP^MR
      ORC|NW|REF-1^EHR|||||^^^^^S
    expect:
      events:
        - emit: referral.created
          fields: {priority: PRIORITY}
  - name: referral without an MRN
    message: |
      MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20250304101500-0600||ORM^O01|C2|P|2.5.1
      PID|1||123^^^HOSP^SS
      ORC|NW|REF-2^EHR
    expect:
      error: {code: required_value_missing, field: patient.identifier}
"""


def write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def good_set(root: Path, priority: str = "stat") -> Path:
    return write(
        root,
        {
            "hl7v2/orders.map.yaml": MAPPING,
            "valuesets/priority.yaml": PRIORITY,
            "hl7v2/tests/orders.cases.yaml": CASES.replace("PRIORITY", priority),
        },
    )


def refloop(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ---- check ----------------------------------------------------------------------------


def test_check_accepts_a_good_set(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps")
    result = refloop("check", str(root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 1 mappings, 1 value sets, overlays: none (digest ")
    assert result.stderr == ""


def test_check_defaults_to_mappings_in_the_working_directory(tmp_path: Path) -> None:
    good_set(tmp_path / "mappings")
    write(tmp_path, {"mappings/sources/acme/valuesets/priority.yaml": PRIORITY})
    result = refloop("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok: 1 mappings, 2 value sets, overlays: acme" in result.stdout


def test_check_prints_every_error_as_file_line_column(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps")
    write(
        root,
        {
            "hl7v2/orders.map.yaml": MAPPING.replace(
                "emit: referral.cancelled", "emit: referal.cancelled"
            ),
            "valuesets/priority.yaml": PRIORITY.replace("on_unmapped: warn", "on_unmaped: warn"),
        },
    )
    result = refloop("check", str(root), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    valueset = root / "valuesets/priority.yaml"
    orders = root / "hl7v2/orders.map.yaml"
    assert lines[0] == (
        f"{valueset}:3:1: error: unknown key 'on_unmaped' (did you mean 'on_unmapped'?); "
        "expected one of schema, id, description, target, case_sensitive, on_unmapped, map"
    )
    # The broken table is missing for the mapping too; both problems are listed.
    assert f"{orders}:13:43: error: no value set 'priority'" in lines[1]
    assert lines[2].startswith(
        f"{orders}:15:11: error: unknown event 'referal.cancelled' "
        "(did you mean 'referral.cancelled'?)"
    )
    assert lines[-1] == f"Error: 3 errors in {root}; nothing was loaded"


def test_check_a_missing_directory(tmp_path: Path) -> None:
    result = refloop("check", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{tmp_path / 'nope'}:1:1: error: no such mappings directory" in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"Error: 1 error in {tmp_path / 'nope'}; nothing was loaded"
    )


# ---- test -----------------------------------------------------------------------------


def test_test_passes_and_summarises(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps")
    result = refloop("test", str(root), "-v", "--coverage", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = root / "hl7v2/tests/orders.cases.yaml"
    assert result.stdout.splitlines() == [
        f"ok   {cases}:3 > urgent referral",
        f"ok   {cases}:12 > referral without an MRN",
        "coverage: t.orders: no case exercises cancel",
        "2 passed, 0 failed",
    ]


def test_test_fails_with_want_got_lines(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps", priority="routine")
    result = refloop("test", str(root), cwd=tmp_path)
    assert result.returncode == 1
    cases = root / "hl7v2/tests/orders.cases.yaml"
    assert result.stdout.splitlines() == [
        f"FAIL {cases}:3 > urgent referral",
        '  events[0].fields.priority  -want "routine"  +got "stat"  (rule new_referral)',
        "1 passed, 1 failed",
    ]


def test_test_filters_by_name(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps", priority="routine")  # the urgent case would fail
    result = refloop("test", str(root), "-k", "MRN", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert result.stdout == "1 passed, 0 failed\n"


def test_test_with_no_cases_fails(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps")
    result = refloop("test", str(root), "-k", "no such case", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == "0 passed, 0 failed\n"


def test_test_refuses_a_bad_set_like_check(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps")
    write(root, {"hl7v2/orders.map.yaml": MAPPING.replace("ORC-2", "ORC-0")})
    result = refloop("test", str(root), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{root / 'hl7v2/orders.map.yaml'}:11:38: error: indices are 1-based" in result.stderr
    assert result.stderr.splitlines()[-1].endswith("; nothing was loaded")
    assert "passed" not in result.stdout


def test_a_bad_fixture_file_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps")
    write(root, {"hl7v2/tests/broken.cases.yaml": "cases:\n  - name: x\n    mesage: y\n"})
    result = refloop("test", str(root), cwd=tmp_path)
    assert result.returncode == 1
    broken = root / "hl7v2/tests/broken.cases.yaml"
    assert f"FAIL {broken}:3 > x\n  {broken}:3:5: unknown key 'mesage'" in result.stdout
    assert result.stdout.splitlines()[-1] == "2 passed, 1 failed"
    assert "Traceback" not in result.stderr


def test_an_unknown_top_level_fixture_key_is_reported_not_a_traceback(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps")
    write(root, {"hl7v2/tests/broken.cases.yaml": "cases: []\nmapings: x\n"})
    result = refloop("test", str(root), cwd=tmp_path)
    assert "Traceback" not in result.stderr
    assert f"{root / 'hl7v2/tests/broken.cases.yaml'}:2" in result.stdout


# ---- schema ---------------------------------------------------------------------------


def test_schema_writes_the_editor_schemas(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps")
    result = refloop("schema", str(root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = [*SCHEMAS, *OUTBOUND_SCHEMAS, *POLICY_SCHEMAS]
    assert result.stdout.splitlines() == [f"wrote {root / '_schema' / name}" for name in names]
    for name in names:
        text = (root / "_schema" / name).read_text(encoding="utf-8")
        want = (
            render(name)
            if name in SCHEMAS
            else render_outbound(name)
            if name in OUTBOUND_SCHEMAS
            else render_policy(name)
        )
        assert text == want
        assert json.loads(text)["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    # The written schemas are not part of the set.
    check = refloop("check", str(root), cwd=tmp_path)
    assert check.returncode == 0, check.stderr


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = refloop("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "Usage:" in result.stdout
    for command in ("check", "test", "schema"):
        assert f"  {command} " in result.stdout


POLICY = """\
schema: referral-policy/v1
windows:
  - id: unscheduled
    states: [sent, accepted]
    within: 14d
    reason: not_scheduled_in_14d
"""

POLICY_CASES = """\
schema: referral-policy-cases/v1
cases:
  - name: sent and never booked
    start: 2026-03-02T09:00:00-05:00
    steps:
      - {at: +0h, event: referral.created, fields: {specialty: cardiology}}
      - at: +1h
        event: referral.sent
        expect:
          set: [{rule: unscheduled, kind: window, due: +WANT}]
"""


def test_check_and_test_cover_the_referral_policy(tmp_path: Path) -> None:
    root = good_set(tmp_path / "maps")
    write(
        root,
        {
            "policies/p.yaml": POLICY,
            "policies/tests/p.cases.yaml": POLICY_CASES.replace("WANT", "14d1h"),
        },
    )
    result = refloop("check", str(root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "policy: 1 windows, 0 ladders" in result.stdout
    passed = refloop("test", str(root), "-v", cwd=tmp_path)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "sent and never booked" in passed.stdout

    write(root, {"policies/tests/p.cases.yaml": POLICY_CASES.replace("WANT", "13d")})
    failed = refloop("test", str(root), cwd=tmp_path)
    assert failed.returncode == 1
    assert "FAIL" in failed.stdout
    assert "-want +13d" in failed.stdout

    write(root, {"policies/p.yaml": POLICY.replace("14d", "two weeks")})
    broken = refloop("check", str(root), cwd=tmp_path)
    assert broken.returncode == 1
    assert f"{root / 'policies' / 'p.yaml'}:5:13: error: within must be a duration" in (
        broken.stderr
    )
