"""The 1-based HL7 v2 path dialect and the lazy message model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.protocol.hl7message import ABSENT, NULL, Delimiters, Message, unescape
from engine.protocol.hl7path import ALL, Filter, PathError, parse_path, read

MESSAGE = Message.parse(
    "MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20261123101500||ORM^O01^ORM_O01|C1|P|2.5.1\r"
    'PID|1||555^^^HOSP^PI~12345^^^HOSP^MR||SYNTH^ALPHA^B||""|F\r'
    "ORC|NW|PLC1^EHR||||||||||1234^DOC^ONE\r"
    "OBX|1|TX|||line one\\.br\\two \\T\\ three\r"
    "OBX|2|TX|||second\r"
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("MSH-9.1", "ORM"),
        ("MSH-9.2", "O01"),
        ("MSH-10", "C1"),
        ("MSH-1", "|"),
        ("MSH-2", "^~\\&"),
        ("PID-3.1", "555"),
        ("PID-3[2].1", "12345"),
        ("PID-3[.5=MR].1", "12345"),
        ("PID-3[.5=PI].4", "HOSP"),
        ("PID-3[.5=XX].1", ABSENT),
        ("PID-5.2", "ALPHA"),
        ("PID-5.9", ABSENT),
        ("PID-7", NULL),
        ("PID-6", ABSENT),
        ("PID-30", ABSENT),
        ("ORC-2.2", "EHR"),
        ("ORC-12.2", "DOC"),
        ("OBX[2]-5", "second"),
        ("OBX[3]-5", ABSENT),
        ("ZZZ-1", ABSENT),
        ("/ORC-1", "NW"),
    ],
)
def test_read_single_values(path, expected):
    assert read(MESSAGE, parse_path(path)) == expected


def test_star_yields_lists():
    assert read(MESSAGE, parse_path("OBX[*]-1")) == ["1", "2"]
    assert read(MESSAGE, parse_path("PID-3[*].5")) == ["PI", "MR"]
    assert read(MESSAGE, parse_path("ZZZ[*]-1")) == []


def test_values_stay_escaped_until_unescaped():
    raw = read(MESSAGE, parse_path("OBX-5"))
    assert raw == "line one\\.br\\two \\T\\ three"
    assert MESSAGE.unescape(raw) == "line one\ntwo & three"


@pytest.mark.parametrize(
    ("escaped", "plain"),
    [
        ("a\\F\\b", "a|b"),
        ("a\\S\\b\\R\\c\\E\\d", "a^b~c\\d"),
        ("\\X41\\\\X4243\\", "ABC"),
        ("\\H\\bold\\N\\", "bold"),
        ("broken \\F", "broken \\F"),
        ("unknown \\Q\\ kept", "unknown \\Q\\ kept"),
    ],
)
def test_unescape(escaped, plain):
    assert unescape(escaped, Delimiters()) == plain


def test_parse_path_fields():
    p = parse_path("PID-3[.5=MR].1")
    assert (p.segment, p.field, p.repetition, p.component) == ("PID", 3, Filter(5, None, "MR"), 1)
    assert parse_path("OBX[*]-5").occurrence == ALL
    assert parse_path("OBX[*]-5").many


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty path"),
        ("pid-3", "segment name"),
        ("PID-0", "1-based"),
        ("PID[0]-3", "1-based"),
        ("PID-3[0]", "1-based"),
        ("PID-3.0", "1-based"),
        ("PID-3..1", "expected"),
        ("PID_3", "expected"),
    ],
)
def test_bad_paths_say_why(path, reason):
    with pytest.raises(PathError) as err:
        parse_path(path)
    assert reason in str(err.value)
    assert err.value.column >= 1


def test_lf_terminated_messages_parse_too():
    m = Message.parse("MSH|^~\\&|A|B|C|D|1||ADT^A08|X|P|2.5\nPID|1||9^^^H^MR\n")
    assert read(m, parse_path("PID-3.1")) == "9"


_TEXT = st.text(alphabet="abcXYZ019 ", min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.lists(_TEXT, min_size=1, max_size=3), min_size=1, max_size=3),
        min_size=1,
        max_size=5,
    )
)
def test_reads_agree_with_how_the_field_was_built(field_reps):
    """Build ZZ1 fields from nested lists; every 1-based path reads back what was put in."""
    fields = ["~".join("^".join(comps) for comps in reps) for reps in field_reps]
    m = Message.parse("MSH|^~\\&|A|B|C|D|1||ADT^A08|X|P|2.5\rZZ1|" + "|".join(fields) + "\r")
    for f, reps in enumerate(field_reps, start=1):
        for r, comps in enumerate(reps, start=1):
            for c, comp in enumerate(comps, start=1):
                assert read(m, parse_path(f"ZZ1-{f}[{r}].{c}")) == comp
            assert read(m, parse_path(f"ZZ1-{f}[{r}].{len(comps) + 1}")) is ABSENT
        assert read(m, parse_path(f"ZZ1-{f}[*].1")) == [comps[0] for comps in reps]
