"""Acknowledgements: codes, MSH-15 conditions, the ACK's MSH, MSA and ERR (tables)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import hl7
import pytest

from engine.protocol.ack import (
    ERROR_CODES,
    AckError,
    Outcome,
    ack_code,
    build_ack,
    hl7_timestamp,
    wants_accept_ack,
)
from engine.protocol.hl7v2 import Header, parse_header

NOW = datetime(2026, 11, 23, 10, 15, 0, tzinfo=UTC)


def header(
    *,
    version: str = "2.5.1",
    msh15: str = "",
    msh16: str = "",
    charset: str = "",
    processing: str = "P",
    control_id: str = "CTRL1",
) -> Header:
    return parse_header(
        f"MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20261123101500||ORM^O01^ORM_O01|{control_id}"
        f"|{processing}|{version}|||{msh15}|{msh16}||{charset}\rPID|1\r".encode()
    )


def parse(ack: bytes, encoding: str = "latin-1") -> hl7.Message:
    """Parse with python-hl7: proves the ACK is well-formed, and gives field access."""
    text = ack.decode(encoding)
    assert text.endswith("\r")
    assert "\n" not in text
    return hl7.parse(text)


def field(msg: hl7.Message, path: str) -> str:
    """The first leaf at ``path`` (e.g. ``ERR.F3.R1.C2``), unescaped by python-hl7."""
    return str(msg[path])


def whole(msg: hl7.Message, segment: str, n: int) -> str:
    """Field ``n`` of ``segment`` as sent, components and escapes included."""
    return str(msg.segment(segment)[n])


def segment_names(msg: hl7.Message) -> list[str]:
    return [str(seg[0]) for seg in msg]


# -- MSA-1 codes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "enhanced", "code"),
    [
        (Outcome.ACCEPT, False, "AA"),
        (Outcome.ERROR, False, "AE"),
        (Outcome.REJECT, False, "AR"),
        (Outcome.ACCEPT, True, "CA"),
        (Outcome.ERROR, True, "CE"),
        (Outcome.REJECT, True, "CR"),
    ],
)
def test_ack_code(outcome: Outcome, enhanced: bool, code: str) -> None:
    assert ack_code(outcome, enhanced=enhanced) == code


# -- MSH-15 accept acknowledgement conditions (table 0155) -------------------------------


@pytest.mark.parametrize(
    ("msh15", "outcome", "wanted"),
    [
        ("AL", Outcome.ACCEPT, True),
        ("AL", Outcome.ERROR, True),
        ("AL", Outcome.REJECT, True),
        ("NE", Outcome.ACCEPT, False),
        ("NE", Outcome.ERROR, False),
        ("NE", Outcome.REJECT, False),
        ("ER", Outcome.ACCEPT, False),
        ("ER", Outcome.ERROR, True),
        ("ER", Outcome.REJECT, True),
        ("SU", Outcome.ACCEPT, True),
        ("SU", Outcome.ERROR, False),
        ("SU", Outcome.REJECT, False),
        ("", Outcome.ACCEPT, True),  # only MSH-16 valued: MSH-15 defaults to always
        ("", Outcome.REJECT, True),
        ("ne", Outcome.ACCEPT, False),  # case-insensitive
        ("er", Outcome.ACCEPT, False),
    ],
)
def test_wants_accept_ack(msh15: str, outcome: Outcome, wanted: bool) -> None:
    h = header(msh15=msh15, msh16="AL")
    assert wants_accept_ack(h, outcome) is wanted


# -- the ACK's MSH ------------------------------------------------------------------------


def test_ack_msh_swaps_sender_and_receiver_and_echoes_ids() -> None:
    ack = parse(build_ack(header(), "AA", control_id="ACK123", now=NOW))
    assert segment_names(ack) == ["MSH", "MSA"]
    assert field(ack, "MSH.F3") == "REFLOOP"
    assert field(ack, "MSH.F4") == "HUB"
    assert field(ack, "MSH.F5") == "EHR"
    assert field(ack, "MSH.F6") == "CLINIC"
    assert field(ack, "MSH.F7") == "20261123101500+0000"
    assert whole(ack, "MSH", 9) == "ACK^O01^ACK"
    assert field(ack, "MSH.F10") == "ACK123"
    assert field(ack, "MSH.F11") == "P"
    assert field(ack, "MSH.F12") == "2.5.1"
    assert field(ack, "MSA.F1") == "AA"
    assert field(ack, "MSA.F2") == "CTRL1"


@pytest.mark.parametrize("control_id", ["CTRL1", "00042", "a-b.c_d", "9" * 20])
def test_msa2_echoes_msh10(control_id: str) -> None:
    ack = parse(build_ack(header(control_id=control_id), "AA", control_id="X", now=NOW))
    assert field(ack, "MSA.F2") == control_id
    assert field(ack, "MSH.F10") == "X"


@pytest.mark.parametrize("processing", ["P", "T", "D", "P^T"])
def test_msh11_processing_id_is_echoed(processing: str) -> None:
    raw = build_ack(header(processing=processing), "AA", control_id="X", now=NOW)
    assert raw.split(b"|")[10] == processing.encode()


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.7", "2.8"])
def test_msh12_version_is_echoed(version: str) -> None:
    ack = parse(build_ack(header(version=version), "AA", control_id="X", now=NOW))
    assert field(ack, "MSH.F12") == version


def test_missing_processing_id_and_version_get_defaults() -> None:
    h = parse_header(b"MSH|^~\\&|EHR|CLINIC|RL|HUB|1||ADT^A01|X1\r")
    ack = parse(build_ack(h, "AA", control_id="X", now=NOW))
    assert field(ack, "MSH.F11") == "P"
    assert field(ack, "MSH.F12") == "2.5.1"


@pytest.mark.parametrize("charset", ["UNICODE UTF-8", "8859/1"])
def test_msh18_is_echoed_in_position_18(charset: str) -> None:
    ack = parse(build_ack(header(charset=charset), "AA", control_id="X", now=NOW))
    assert field(ack, "MSH.F18") == charset
    assert field(ack, "MSH.F17") == ""


def test_msh18_position_in_enhanced_mode() -> None:
    h = header(msh15="AL", msh16="NE", charset="8859/1")
    ack = parse(build_ack(h, "CA", control_id="X", now=NOW))
    assert field(ack, "MSH.F15") == "NE"
    assert field(ack, "MSH.F16") == "NE"
    assert field(ack, "MSH.F18") == "8859/1"


def test_no_msh18_in_ack_when_message_had_none() -> None:
    raw = build_ack(header(), "AA", control_id="X", now=NOW)
    msh = raw.split(b"\r")[0]
    assert msh.count(b"|") == 11  # MSH-1 .. MSH-12


def test_enhanced_mode_ack_asks_for_no_acknowledgement() -> None:
    ack = parse(build_ack(header(msh15="AL", msh16="AL"), "CA", control_id="X", now=NOW))
    assert field(ack, "MSA.F1") == "CA"
    assert (field(ack, "MSH.F15"), field(ack, "MSH.F16")) == ("NE", "NE")


def test_original_mode_ack_leaves_msh15_msh16_empty() -> None:
    ack = parse(build_ack(header(charset="8859/1"), "AA", control_id="X", now=NOW))
    assert (field(ack, "MSH.F15"), field(ack, "MSH.F16")) == ("", "")


NON_DEFAULT = (
    b"MSH#$*@!#EHR#CLI$NIC#REFLOOP#HUB#20261123101500##ORM$O01$ORM_O01#C9#P#2.5.1"
    b"######8859/1\rPID#1\r"
)


def test_ack_echoes_non_default_delimiters() -> None:
    h = parse_header(NON_DEFAULT)
    raw = build_ack(
        h, "AE", control_id="ACK9", now=NOW, error=AckError(103, "bad | ^ # $ * @ ! & ~ \\ x")
    )
    assert raw.startswith(b"MSH#$*@!#REFLOOP#HUB#EHR#CLI$NIC#")
    ack = parse(raw)
    assert field(ack, "MSH.F1") == "#"
    assert field(ack, "MSH.F2") == "$*@!"
    assert whole(ack, "MSH", 6) == "CLI$NIC"
    assert field(ack, "MSH.F9.R1.C1") == "ACK"
    assert field(ack, "MSH.F9.R1.C2") == "O01"
    assert field(ack, "MSH.F18") == "8859/1"
    assert field(ack, "MSA.F2") == "C9"
    assert field(ack, "ERR.F3.R1.C1") == "103"
    assert field(ack, "ERR.F3.R1.C3") == "HL70357"
    assert field(ack, "ERR.F8") == "bad | ^ # $ * @ ! & ~ \\ x"
    assert field(ack, "MSA.F3") == "bad | ^ # $ * @ ! & ~ \\ x"


def test_bare_ack_when_no_header_could_be_read() -> None:
    raw = build_ack(None, "AR", control_id="N1", now=NOW, error=AckError(100, "no MSH", "MSH"))
    ack = parse(raw)
    assert segment_names(ack) == ["MSH", "MSA", "ERR"]
    assert field(ack, "MSH.F2") == "^~\\&"
    assert field(ack, "MSH.F3") == "REFLOOP"
    assert whole(ack, "MSH", 9) == "ACK"
    assert field(ack, "MSH.F10") == "N1"
    assert field(ack, "MSH.F12") == "2.5.1"
    assert field(ack, "MSA.F1") == "AR"
    assert field(ack, "MSA.F2") == ""
    assert field(ack, "ERR.F3.R1.C1") == "100"


# -- ERR ----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_err_v25_layout(code: int) -> None:
    error = AckError(code, "what to fix", "MSH-18")
    ack = parse(build_ack(header(version="2.5.1"), "AE", control_id="X", now=NOW, error=error))
    assert segment_names(ack) == ["MSH", "MSA", "ERR"]
    assert field(ack, "ERR.F1") == ""
    assert whole(ack, "ERR", 2) == "MSH^1^18"
    assert field(ack, "ERR.F3.R1.C1") == str(code)
    assert field(ack, "ERR.F3.R1.C2") == ERROR_CODES[code]
    assert field(ack, "ERR.F3.R1.C3") == "HL70357"
    assert field(ack, "ERR.F4") == "E"
    assert field(ack, "ERR.F8") == "what to fix"
    assert field(ack, "MSA.F3") == "what to fix"


@pytest.mark.parametrize("version", ["2.5", "2.5.1", "2.6", "2.7", "2.8.2", "3", "", "garbage"])
def test_err_v25_layout_for_newer_or_unreadable_versions(version: str) -> None:
    error = AckError(200, "unsupported", "MSH-9")
    ack = parse(build_ack(header(version=version), "AR", control_id="X", now=NOW, error=error))
    assert field(ack, "ERR.F3.R1.C1") == "200"
    assert field(ack, "ERR.F4") == "E"


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.3", "2.3.1", "2.4"])
def test_err_v23_v24_layout_uses_eld_in_err1(version: str) -> None:
    error = AckError(101, "MSH-10 is required", "MSH-10")
    raw = build_ack(header(version=version), "AR", control_id="X", now=NOW, error=error)
    ack = parse(raw)
    err = raw.split(b"\r")[2]
    assert err == b"ERR|MSH^1^10^101&Required field missing&HL70357"
    assert field(ack, "ERR.F1.R1.C1") == "MSH"
    assert field(ack, "ERR.F1.R1.C2") == "1"
    assert field(ack, "ERR.F1.R1.C3") == "10"
    assert str(ack["ERR.F1.R1.C4.S1"]) == "101"
    assert str(ack["ERR.F1.R1.C4.S3"]) == "HL70357"
    assert field(ack, "MSA.F3") == "MSH-10 is required"


def test_err_v23_without_location() -> None:
    raw = build_ack(header(version="2.3"), "AR", control_id="X", now=NOW, error=AckError(207, "x"))
    assert raw.split(b"\r")[2] == b"ERR|^^^207&Application internal error&HL70357"


def test_err_v25_without_location_leaves_err2_empty() -> None:
    raw = build_ack(header(), "AR", control_id="X", now=NOW, error=AckError(104, "too big"))
    assert raw.split(b"\r")[2].split(b"|")[:5] == [
        b"ERR",
        b"",
        b"",
        b"104^Value too long^HL70357",
        b"E",
    ]


def test_err_code_outside_the_table_gets_a_generic_name() -> None:
    raw = build_ack(header(), "AE", control_id="X", now=NOW, error=AckError(199, "other"))
    assert b"199^Application error^HL70357" in raw


@pytest.mark.parametrize(
    "reason",
    [
        "a|b",
        "a^b",
        "a~b&c",
        "back\\slash",
        "two\rlines\nhere",
        "|||^^^~~~&&&\\\\\\",
        "\\F\\ looks escaped",
    ],
)
def test_reasons_are_escaped_and_cannot_break_fields(reason: str) -> None:
    error = AckError(102, reason, "MSH-18")
    raw = build_ack(header(), "AE", control_id="X", now=NOW, error=error)
    segments = raw.split(b"\r")
    assert len(segments) == 4  # MSH, MSA, ERR and the empty tail after the last CR
    assert len(segments[1].split(b"|")) == 4  # MSA-1..MSA-3
    assert len(segments[2].split(b"|")) == 9  # ERR-1..ERR-8
    ack = parse(raw)
    flat = reason.replace("\r", " ").replace("\n", " ")
    assert field(ack, "ERR.F8") == flat
    assert field(ack, "MSA.F3") == flat
    assert field(ack, "ERR.F3.R1.C1") == "102"


def test_no_err_and_no_msa3_when_accepted() -> None:
    raw = build_ack(header(), "AA", control_id="X", now=NOW)
    assert b"ERR" not in raw
    assert raw.split(b"\r")[1] == b"MSA|AA|CTRL1"


# -- encoding and time --------------------------------------------------------------------


def test_ack_is_encoded_with_the_message_codec() -> None:
    h = parse_header("MSH|^~\\&|EHR|KLINIK MÜNCHEN|RL|HUB|1||ADT^A01|X1|P|2.5\r".encode())
    h = h.recoded("utf-8")
    raw = build_ack(h, "AA", control_id="X", now=NOW, charset_codec="utf-8")
    assert "|KLINIK MÜNCHEN|".encode() in raw
    raw = build_ack(h, "AA", control_id="X", now=NOW, charset_codec="ascii")
    assert b"|KLINIK M?NCHEN|" in raw  # unencodable characters never raise


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "20260102030405+0000"),
        (
            datetime(2026, 7, 1, 12, 0, 0, tzinfo=timezone(timedelta(hours=-5))),
            "20260701120000-0500",
        ),
    ],
)
def test_hl7_timestamp(moment: datetime, expected: str) -> None:
    assert hl7_timestamp(moment) == expected


@pytest.mark.parametrize(
    ("version", "msh9", "msa_fields"),
    [
        ("2.2", "ACK^O01", 4),
        ("2.3", "ACK^O01", 4),
        ("2.3.1", "ACK^O01^ACK", 4),
        ("2.6", "ACK^O01^ACK", 4),
        ("2.7", "ACK^O01^ACK", 3),  # MSA-3 withdrawn in v2.7: the reason is in ERR-8 only
        ("2.8", "ACK^O01^ACK", 3),
    ],
)
def test_version_specific_ack_shape(version: str, msh9: str, msa_fields: int) -> None:
    ack = build_ack(
        header(version=version),
        "AR",
        control_id="A1",
        now=NOW,
        error=AckError(200, "unsupported"),
    ).decode()
    segs = {s.split("|")[0]: s.split("|") for s in ack.split("\r") if s}
    assert segs["MSH"][8] == msh9
    assert len(segs["MSA"]) == msa_fields
