"""Analysts' YAML: codes stay text, duplicates and syntax errors point at file:line:column."""

from __future__ import annotations

import pytest

from engine.mapping.source import Position, SourceError, load, loads


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("NO", "NO"),  # Norway, not False
        ("ON", "ON"),  # Ontario, not True
        ("yes", "yes"),
        ("010", "010"),  # not 8
        ("1980-01-01", "1980-01-01"),  # not a date
        ("1.50", "1.50"),
        ("'quoted'", "quoted"),
        ("", None),
        ("~", None),
    ],
)
def test_scalars_stay_what_the_analyst_typed(literal, expected):
    assert loads(f"code: {literal}\n").data == {"code": expected}


def test_positions_are_one_based_and_follow_the_key_path():
    doc = loads("rules:\n  - id: first\n    when:\n      present: PID-3\n", "x.yaml")
    assert doc.data == {"rules": [{"id": "first", "when": {"present": "PID-3"}}]}
    assert doc.positions[("rules", 0, "when", "present")] == Position(4, 16)
    err = doc.error(("rules", 0, "when", "present"), "unknown path")
    assert str(err) == "x.yaml:4:16: unknown path"
    # A path that was never written points at its nearest written parent.
    assert doc.error(("rules", 0, "nope"), "missing").line == 2


def test_duplicate_keys_are_refused_with_both_places():
    with pytest.raises(SourceError) as err:
        loads("id: a\ntitle: t\nid: b\n", "dup.yaml")
    assert (err.value.line, err.value.column) == (3, 1)
    assert "duplicate key 'id' (first at line 1)" in str(err.value)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("a: [1, 2\n", 2, "YAML syntax"),
        ("a:\n\t- b\n", 2, "YAML syntax"),
        ("base: &b {x: 1}\nuse:\n  <<: *b\n", 3, "merge keys"),
        ("? [complex, key]\n: value\n", 1, "plain text"),
    ],
)
def test_bad_yaml_is_located(text, line, fragment):
    with pytest.raises(SourceError) as err:
        loads(text, "bad.yaml")
    assert err.value.line == line
    assert fragment in err.value.message
    assert str(err.value).startswith(f"bad.yaml:{line}:")


def test_load_reads_files_and_refuses_non_utf8(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("code: NO\n")
    assert load(good).data == {"code": "NO"}
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"code: \xff\n")
    with pytest.raises(SourceError, match="not UTF-8"):
        load(bad)
