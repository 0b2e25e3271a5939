"""Reading just the MSH: delimiters, required fields, terminators, character sets."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.protocol.hl7v2 import (
    CHARSETS,
    Header,
    HeaderError,
    codec_for,
    decode,
    escape,
    parse_header,
    split_segments,
)

MSH = (
    "MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20261123101500||ORM^O01^ORM_O01|CTRL1|P|2.5.1"
    "|||AL|NE||UNICODE UTF-8"
)
PID = "PID|1||12345^^^HOSP^MR||ZZTESTNAME^QUUX"


def message(msh: str = MSH, *, term: str = "\r", body: tuple[str, ...] = (PID,)) -> bytes:
    return term.join((msh, *body)).encode("utf-8") + term.encode()


def header_error(payload: bytes, **kw: bool) -> HeaderError:
    with pytest.raises(HeaderError) as info:
        parse_header(payload, **kw)
    return info.value


# -- the fields ---------------------------------------------------------------------------


def test_fields_are_read_by_their_standard_numbers() -> None:
    h = parse_header(message())
    assert h == Header(
        field_sep="|",
        encoding_chars="^~\\&",
        sending_application="EHR",
        sending_facility="CLINIC",
        receiving_application="REFLOOP",
        receiving_facility="HUB",
        timestamp="20261123101500",
        message_type="ORM^O01^ORM_O01",
        control_id="CTRL1",
        processing_id="P",
        version="2.5.1",
        accept_ack_type="AL",
        application_ack_type="NE",
        charset="UNICODE UTF-8",
        segment_terminator="\r",
    )
    assert (h.message_code, h.trigger_event, h.type_label) == ("ORM", "O01", "ORM^O01")
    assert h.component_sep == "^"
    assert h.enhanced_mode


def test_short_msh_leaves_missing_optional_fields_empty() -> None:
    h = parse_header(b"MSH|^~\\&|EHR|CLINIC|||||ADT^A01|X1\r")
    assert (h.version, h.accept_ack_type, h.application_ack_type, h.charset) == ("", "", "", "")
    assert not h.enhanced_mode


def test_msh9_without_trigger() -> None:
    h = parse_header(b"MSH|^~\\&|A|B|C|D|20260101||ACK|X1|P|2.5\r")
    assert (h.message_code, h.trigger_event, h.type_label) == ("ACK", "", "ACK")


def test_version_keeps_only_msh12_first_component() -> None:
    h = parse_header(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|X1|P|2.5.1^USA^HL70399\r")
    assert h.version == "2.5.1"


def test_charset_keeps_only_msh18_first_repetition() -> None:
    h = parse_header(b"MSH|^~\\&|A|B|C|D|1||ADT^A01|X1|P|2.5||||||8859/1~ISO IR87\r")
    assert h.charset == "8859/1"


@pytest.mark.parametrize(
    ("msh15", "msh16", "enhanced"),
    [("", "", False), ("AL", "", True), ("", "AL", True), ("NE", "NE", True)],
)
def test_enhanced_mode_when_msh15_or_msh16_valued(msh15: str, msh16: str, enhanced: bool) -> None:
    h = parse_header(f"MSH|^~\\&|A|B|C|D|1||ADT^A01|X1|P|2.5|||{msh15}|{msh16}\r".encode())
    assert h.enhanced_mode is enhanced


def test_non_default_delimiters_are_honoured() -> None:
    h = parse_header(b"MSH#$*@!#EHR#CLINIC#RL#HUB#20260101##ORM$O01$ORM_O01#C9#P#2.5.1$X\r")
    assert h.field_sep == "#"
    assert h.encoding_chars == "$*@!"
    assert h.component_sep == "$"
    assert (h.message_code, h.trigger_event) == ("ORM", "O01")
    assert h.control_id == "C9"
    assert h.version == "2.5.1"


def test_five_encoding_characters_of_v27_are_accepted() -> None:
    h = parse_header(b"MSH|^~\\&#|A|B|C|D|1||ADT^A01|X1|P|2.7\r")
    assert h.encoding_chars == "^~\\&#"


def test_single_segment_without_terminator() -> None:
    h = parse_header(b"MSH|^~\\&|A|B|C|D|1||ADT^A01|X1|P|2.5")
    assert h.control_id == "X1"
    assert h.segment_terminator == "\r"


# -- errors: 100 (structure), 101 (required field) ---------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\r\n",
        b"PID|1||42\r",
        b"hello world",
        b"FHS|^~\\&|A\r",
    ],
    ids=["empty", "blank", "pid-only", "text", "fhs"],
)
def test_no_msh_is_error_100(payload: bytes) -> None:
    err = header_error(payload)
    assert err.code == 100
    assert err.field == "MSH"


def test_msh_not_first_says_so() -> None:
    err = header_error(b"PID|1\rMSH|^~\\&|A|B|C|D|1||ADT^A01|X1|P|2.5\r")
    assert (err.code, err.field) == (100, "MSH")
    assert "does not start with" in err.reason


def test_truncated_msh_is_error_100() -> None:
    err = header_error(b"MSH|^~\r")
    assert (err.code, err.field) == (100, "MSH")


@pytest.mark.parametrize("sep", ["A", "1", " ", "\t"])
def test_invalid_field_separator_is_error_100_on_msh1(sep: str) -> None:
    err = header_error(f"MSH{sep}^~\\&{sep}A{sep}B\r".encode())
    assert (err.code, err.field) == (100, "MSH-1")


@pytest.mark.parametrize(
    "encoding_chars",
    [
        "^~\\",  # too short
        "^~\\&#x",  # too long
        "^^\\&",  # repeated delimiter
        "^~|&",  # contains the field separator (the split shortens it)
        "^~\\A",  # alphanumeric
        "^~ &",  # space
        "",  # empty
    ],
)
def test_broken_encoding_characters_are_error_100_on_msh2(encoding_chars: str) -> None:
    err = header_error(f"MSH|{encoding_chars}|A|B|C|D|1||ADT^A01|X1|P|2.5\r".encode())
    assert (err.code, err.field) == (100, "MSH-2")


@pytest.mark.parametrize(
    ("msh", "field"),
    [
        ("MSH|^~\\&|A|B|C|D|1||", "MSH-9"),
        ("MSH|^~\\&|A|B|C|D|1|||X1|P|2.5", "MSH-9"),
        ("MSH|^~\\&|A|B|C|D|1||  |X1|P|2.5", "MSH-9"),
        ("MSH|^~\\&|A|B|C|D|1||ADT^A01", "MSH-10"),
        ("MSH|^~\\&|A|B|C|D|1||ADT^A01||P|2.5", "MSH-10"),
        ("MSH|^~\\&|A|B|C|D|1||ADT^A01| |P|2.5", "MSH-10"),
    ],
)
def test_missing_msh9_or_msh10_is_error_101(msh: str, field: str) -> None:
    err = header_error((msh + "\r").encode())
    assert (err.code, err.field) == (101, field)
    assert field in err.reason


# -- terminators --------------------------------------------------------------------------


@pytest.mark.parametrize(("term", "expected"), [("\r", "\r"), ("\n", "\n"), ("\r\n", "\r\n")])
def test_terminators_accepted_by_default(term: str, expected: str) -> None:
    h = parse_header(message(term=term))
    assert h.segment_terminator == expected
    assert h.charset == "UNICODE UTF-8"  # the MSH did not swallow the next segment


@pytest.mark.parametrize("term", ["\n", "\r\n"])
def test_strict_refuses_lf_and_crlf(term: str) -> None:
    err = header_error(message(term=term), strict_terminators=True)
    assert (err.code, err.field) == (100, "MSH")
    assert "CR" in err.reason


def test_strict_accepts_cr() -> None:
    assert parse_header(message(), strict_terminators=True).control_id == "CTRL1"


def test_lf_inside_a_later_segment_does_not_confuse_crlf_detection() -> None:
    payload = MSH.encode() + b"\rNTE|1||line one\nline two\r"
    assert parse_header(payload, strict_terminators=True).segment_terminator == "\r"


@pytest.mark.parametrize("lead", [b"\n", b"\r\n", b"\r\r\n\n", b"  \t\n"])
def test_leading_newlines_and_blanks_are_tolerated(lead: bytes) -> None:
    assert parse_header(lead + message()).control_id == "CTRL1"


# -- character sets (MSH-18, table 0211) --------------------------------------------------


@pytest.mark.parametrize(
    ("msh18", "codec"),
    [
        ("8859/1", "latin-1"),
        ("8859/15", "iso8859-15"),
        ("UNICODE UTF-8", "utf-8"),
        ("unicode utf-8", "utf-8"),
        (" UNICODE UTF-8 ", "utf-8"),
        ("ASCII", "ascii"),
        ("ISO IR100", "latin-1"),
        ("ISO IR192", "utf-8"),
        ("WINDOWS-1252", "cp1252"),
    ],
)
def test_msh18_maps_to_a_python_codec(msh18: str, codec: str) -> None:
    assert codec_for(msh18, "utf-8") == codec


@pytest.mark.parametrize("msh18", ["", "  "])
def test_empty_msh18_uses_listener_default(msh18: str) -> None:
    assert codec_for(msh18, "cp1252") == "cp1252"


@pytest.mark.parametrize("msh18", ["KLINGON", "UTF-9", "8859/99"])
def test_unknown_msh18_is_error_103(msh18: str) -> None:
    with pytest.raises(HeaderError) as info:
        codec_for(msh18, "utf-8")
    assert (info.value.code, info.value.field) == (103, "MSH-18")
    assert msh18 not in info.value.reason


def test_every_table_entry_is_a_real_text_codec() -> None:
    for name, codec in CHARSETS.items():
        assert name == name.upper()
        assert "MSH".encode(codec)  # raises LookupError for an unknown or non-text codec


def test_decode_uses_the_codec() -> None:
    assert decode("MÜLLER".encode("latin-1"), "latin-1") == "MÜLLER"
    assert decode("MÜLLER".encode(), "utf-8") == "MÜLLER"


def test_undecodable_bytes_are_error_102_with_offset_and_no_content() -> None:
    payload = b"PID|1||42||ZZTESTNAME^QUUX\xff\xfeREST"
    with pytest.raises(HeaderError) as info:
        decode(payload, "utf-8")
    err = info.value
    assert (err.code, err.field) == (102, "MSH-18")
    assert f"offset {payload.index(0xFF)}" in err.reason
    assert "utf-8" in err.reason
    assert "ZZTESTNAME" not in err.reason
    assert "QUUX" not in err.reason
    assert "REST" not in err.reason


def test_header_recoded_with_the_message_codec() -> None:
    payload = "MSH|^~\\&|EHR|KLINIK MÜNCHEN|RL|HUB|1||ADT^A01|X1|P|2.5\r".encode()
    h = parse_header(payload)
    assert h.sending_facility == "KLINIK MÃ\x9cNCHEN"  # latin-1 view of the UTF-8 bytes
    assert h.recoded("utf-8").sending_facility == "KLINIK MÜNCHEN"
    assert h.recoded("utf-8").control_id == "X1"
    assert h.recoded("latin-1") == h


def test_header_recoded_keeps_latin1_view_when_a_field_does_not_decode() -> None:
    h = parse_header(b"MSH|^~\\&|EHR|CAF\xe9|RL|HUB|1||ADT^A01|X1|P|2.5\r")
    assert h.recoded("utf-8") is h


# -- segments and escaping ----------------------------------------------------------------


@pytest.mark.parametrize("term", ["\r", "\n", "\r\n"])
def test_split_segments_accepts_any_terminator_and_drops_empties(term: str) -> None:
    text = term.join(["MSH|^~\\&|A", "PID|1", "", "OBX|1"]) + term + term
    assert split_segments(text) == ["MSH|^~\\&|A", "PID|1", "OBX|1"]


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain text", "plain text"),
        ("a|b", "a\\F\\b"),
        ("a^b", "a\\S\\b"),
        ("a&b", "a\\T\\b"),
        ("a~b", "a\\R\\b"),
        ("a\\b", "a\\E\\b"),
        ("\\F\\", "\\E\\F\\E\\"),
        ("line1\rline2\nline3", "line1 line2 line3"),
    ],
)
def test_escape_default_delimiters(raw: str, escaped: str) -> None:
    assert escape(raw) == escaped


def test_escape_non_default_delimiters() -> None:
    assert escape("a#b$c*d@e!f|", "#", "$*@!") == "a@F@b@S@c@R@d@E@e@T@f|"


_UNESCAPE = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("|^~\\&abcFSTRE\r\n "), max_size=40))
def test_escaped_text_has_no_bare_delimiters_and_round_trips(text: str) -> None:
    out = escape(text)
    assert not set(out) & set("|^~&\r\n")
    # Every escape character in the output opens a complete \X\ sequence, so a
    # left-to-right unescape restores the text (line breaks become spaces).
    assert re.sub(r"\\([FSTRE])\\", lambda m: _UNESCAPE[m[1]], out) == text.replace(
        "\r", " "
    ).replace("\n", " ")


def test_utf8_byte_order_mark_before_msh_is_tolerated() -> None:
    h = parse_header(b"\xef\xbb\xbfMSH|^~\\&|A|B|C|D|1||ADT^A01|BOM1|P|2.5\r")
    assert h.control_id == "BOM1"
