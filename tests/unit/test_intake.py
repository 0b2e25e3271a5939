"""Intake: the verdict on one frame, its ACK, its dedup key and its stored row (pure)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import hl7
import pytest

from engine.protocol.ack import Outcome
from engine.protocol.hl7v2 import parse_header
from engine.services.intake import (
    MESSAGE_TYPES,
    AckMode,
    Answer,
    Policy,
    ack_for,
    assess,
    assess_oversize,
    dedup_key,
    record,
    storage_failure_ack,
)
from tests import helpers

NOW = datetime(2026, 11, 23, 10, 15, 0, tzinfo=UTC)
POLICY = Policy()
#: A synthetic, distinctive patient name: it must never reach a reason or an ACK.
NAME_PARTS = ("ZZTESTNAME", "QUUX")
PID = "PID|1||12345^^^HOSP^MR||ZZTESTNAME^QUUX||19700101|F"


def msg(*args: Any, body: str = PID + "\rORC|NW|PLC1\r", **kw: Any) -> bytes:
    """tests.helpers.msg, with the distinctive synthetic patient in PID by default."""
    return helpers.msg(*args, body=body, **kw)


def ack_segments(ack: bytes, encoding: str = "latin-1") -> hl7.Message:
    return hl7.parse(ack.decode(encoding))


def assert_no_phi(*texts: str | bytes | None) -> None:
    for text in texts:
        if text is None:
            continue
        blob = text if isinstance(text, bytes) else text.encode("utf-8")
        for part in NAME_PARTS:
            assert part.encode() not in blob, f"{part} leaked"


# -- accepted ------------------------------------------------------------------------------


def test_a_good_message_is_received_with_key_and_digest() -> None:
    payload = msg()
    intake = assess(payload, POLICY)
    assert intake.outcome is Outcome.ACCEPT
    assert intake.status == "received"
    assert intake.error is None
    assert intake.codec == "utf-8"
    assert intake.header is not None
    assert intake.header.control_id == "CTRL1"
    assert intake.dedup_key == dedup_key(intake.header)
    assert intake.payload_sha256 == hashlib.sha256(payload).hexdigest()
    assert intake.type_label == "ORM^O01"


@pytest.mark.parametrize(
    ("mode", "msh15", "msh16", "code"),
    [
        ("auto", "", "", "AA"),
        ("auto", "AL", "", "CA"),
        ("auto", "", "AL", "CA"),
        ("original", "AL", "AL", "AA"),
        ("enhanced", "", "", "CA"),
        ("enhanced", "AL", "NE", "CA"),
    ],
)
def test_ack_mode_decides_the_code(mode: AckMode, msh15: str, msh16: str, code: str) -> None:
    intake = assess(msg(msh15=msh15, msh16=msh16), POLICY)
    answer = ack_for(intake, mode, control_id="A1", now=NOW)
    assert answer.code == code
    assert answer.ack is not None
    ack = ack_segments(answer.ack)
    assert str(ack["MSA.F1"]) == code
    assert str(ack["MSA.F2"]) == "CTRL1"
    assert str(ack["MSH.F10"]) == "A1"


@pytest.mark.parametrize(
    ("mode", "msh15", "payload_ok", "sent"),
    [
        ("auto", "NE", True, False),
        ("auto", "NE", False, False),
        ("auto", "ER", True, False),
        ("auto", "ER", False, True),
        ("auto", "SU", True, True),
        ("auto", "SU", False, False),
        ("auto", "AL", False, True),
        ("enhanced", "NE", True, False),
        ("original", "NE", True, True),  # original mode ignores MSH-15
        ("original", "NE", False, True),
    ],
)
def test_msh15_decides_whether_an_accept_ack_is_sent(
    mode: AckMode, msh15: str, payload_ok: bool, sent: bool
) -> None:
    charset = "" if payload_ok else "KLINGON"
    intake = assess(msg(msh15=msh15, msh16="AL", charset=charset), POLICY)
    assert (intake.outcome is Outcome.ACCEPT) is payload_ok
    answer = ack_for(intake, mode, control_id="A1", now=NOW, honour_accept_ack_type=True)
    assert (answer.ack is not None) is sent
    assert answer.code == ("C" if mode != "original" else "A") + ("A" if payload_ok else "E")


@pytest.mark.parametrize("msh15", ["NE", "ER", "SU", "AL"])
@pytest.mark.parametrize("payload_ok", [True, False])
def test_every_frame_is_answered_unless_the_listener_honours_msh15(
    msh15: str, payload_ok: bool
) -> None:
    charset = "" if payload_ok else "KLINGON"
    intake = assess(msg(msh15=msh15, msh16="AL", charset=charset), POLICY)
    answer = ack_for(intake, "auto", control_id="A1", now=NOW)
    assert answer.ack is not None
    assert answer.code == ("CA" if payload_ok else "CE")


def test_msh18_decodes_latin1_message() -> None:
    payload = msg(charset="8859/1", body="PID|1||1||MÜLLER^JÖRG\r", encoding="latin-1")
    intake = assess(payload, POLICY)
    assert intake.outcome is Outcome.ACCEPT
    assert intake.codec == "latin-1"


def test_listener_default_charset_applies_when_msh18_empty() -> None:
    payload = msg(body="PID|1||1||MÜLLER\r", encoding="cp1252")
    assert assess(payload, replace(POLICY, default_charset="cp1252")).outcome is Outcome.ACCEPT
    assert assess(payload, POLICY).outcome is Outcome.ERROR  # utf-8 default: 0xDC is invalid


def test_non_ascii_header_is_echoed_byte_for_byte_and_stored_decoded() -> None:
    payload = msg(facility="KLINIK MÜNCHEN")
    intake = assess(payload, POLICY)
    assert intake.header is not None
    assert intake.header.sending_facility == "KLINIK MÜNCHEN"
    answer = ack_for(intake, "auto", control_id="A1", now=NOW)
    assert answer.ack is not None
    assert "|EHR|KLINIK MÜNCHEN|".encode() in answer.ack
    row = record(intake, payload=payload, listener="t", peer="p", received_at=NOW, answer=answer)
    assert row["sending_facility"] == "KLINIK MÜNCHEN"


def test_undecodable_message_echoes_header_bytes_unchanged() -> None:
    payload = msg(facility="KLINIK MÜNCHEN") + b"OBX|1|TX|||\xff\r"
    intake = assess(payload, POLICY)
    assert intake.error is not None
    assert intake.error.code == 102
    answer = ack_for(intake, "auto", control_id="A1", now=NOW)
    assert answer.ack is not None
    assert "|EHR|KLINIK MÜNCHEN|".encode() in answer.ack


def test_ack_message_type_is_accepted() -> None:
    intake = assess(msg(mtype="ACK^O01^ACK"), POLICY)
    assert intake.outcome is Outcome.ACCEPT


# -- refused, and never leaking the patient --------------------------------------------------

FAILING: list[tuple[str, bytes, Policy, Outcome, int, str]] = [
    ("no-msh", (PID + "\r").encode(), POLICY, Outcome.REJECT, 100, "MSH"),
    ("msh-not-first", (PID + "\r").encode() + msg(), POLICY, Outcome.REJECT, 100, "MSH"),
    (
        "bad-msh2",
        msg().replace(b"^~\\&", b"^^\\&", 1),
        POLICY,
        Outcome.REJECT,
        100,
        "MSH-2",
    ),
    ("no-msh9", msg(mtype=""), POLICY, Outcome.REJECT, 101, "MSH-9"),
    ("no-msh10", msg(control_id=""), POLICY, Outcome.REJECT, 101, "MSH-10"),
    (
        "strict-lf",
        msg(term="\n"),
        replace(POLICY, strict_segment_terminators=True),
        Outcome.REJECT,
        100,
        "MSH",
    ),
    ("unknown-charset", msg(charset="KLINGON"), POLICY, Outcome.ERROR, 103, "MSH-18"),
    (
        "undecodable",
        msg(body=PID + "\xff\r").replace("\xff".encode(), b"\xff"),
        POLICY,
        Outcome.ERROR,
        102,
        "MSH-18",
    ),
    (
        "undecodable-ascii",
        msg(body="PID|1||1||ZZTESTNAME^QUUX\xe9\r", encoding="latin-1"),
        replace(POLICY, default_charset="ascii"),
        Outcome.ERROR,
        102,
        "MSH-18",
    ),
    ("unknown-type", msg(mtype="QQQ^Q01"), POLICY, Outcome.REJECT, 200, "MSH-9"),
    ("lowercase-type", msg(mtype="orm^O01"), POLICY, Outcome.REJECT, 200, "MSH-9"),
    (
        "type-not-allowed",
        msg(mtype="ADT^A01"),
        replace(POLICY, message_types=frozenset({"ORM", "SIU"})),
        Outcome.REJECT,
        200,
        "MSH-9",
    ),
]


@pytest.mark.parametrize(
    ("payload", "policy", "outcome", "code", "field"),
    [case[1:] for case in FAILING],
    ids=[case[0] for case in FAILING],
)
@pytest.mark.parametrize("mode", ["auto", "original", "enhanced"])
def test_failing_frames_get_a_coded_answer_without_patient_data(
    payload: bytes, policy: Policy, outcome: Outcome, code: int, field: str, mode: AckMode
) -> None:
    assert b"ZZTESTNAME^QUUX" in payload  # the name really is in the input
    intake = assess(payload, policy)
    assert intake.outcome is outcome
    assert intake.status == ("rejected" if outcome is Outcome.REJECT else "error")
    assert intake.error is not None
    assert (intake.error.code, intake.error.field) == (code, field)
    assert intake.dedup_key is None
    assert intake.payload_sha256 == hashlib.sha256(payload).hexdigest()

    answer = ack_for(intake, mode, control_id="A1", now=NOW)
    assert answer.ack is not None
    enhanced = mode == "enhanced"
    assert answer.code == ("C" if enhanced else "A") + ("R" if outcome is Outcome.REJECT else "E")
    ack = ack_segments(answer.ack)
    assert str(ack["MSA.F1"]) == answer.code
    assert str(ack["ERR.F3.R1.C1"]) == str(code)
    if intake.header is not None:
        assert str(ack["MSA.F2"]) == intake.header.control_id

    failed = storage_failure_ack(intake, mode, control_id="A2", now=NOW)
    row = record(intake, payload=payload, listener="t", peer="p", received_at=NOW, answer=answer)
    assert_no_phi(intake.error.reason, answer.ack, failed, row["error"])


def test_allow_list_reason_names_the_refused_type() -> None:
    policy = replace(POLICY, message_types=frozenset({"ORM"}))
    intake = assess(msg(mtype="ADT^A01"), policy)
    assert intake.error is not None
    assert "ADT" in intake.error.reason


@pytest.mark.parametrize("mtype", ["ORM^O01", "SIU^S12", "REF^I12"])
def test_allow_list_admits_listed_types(mtype: str) -> None:
    policy = replace(POLICY, message_types=frozenset({"ORM", "SIU", "REF"}))
    assert assess(msg(mtype=mtype), policy).outcome is Outcome.ACCEPT


def test_empty_allow_list_admits_every_table_0076_type() -> None:
    for code in sorted(MESSAGE_TYPES):
        assert assess(msg(mtype=f"{code}^X01"), POLICY).outcome is Outcome.ACCEPT, code


def test_unknown_type_wins_over_undecodable_bytes() -> None:
    payload = msg(mtype="QQQ^Q01", body="PID|1\r") + b"\xff\r"
    intake = assess(payload, POLICY)
    assert intake.error is not None
    assert (intake.outcome, intake.error.code) == (Outcome.REJECT, 200)


def test_unparseable_header_gets_a_bare_ack() -> None:
    intake = assess(b"garbage ZZTESTNAME^QUUX", POLICY)
    assert intake.header is None
    assert intake.type_label == "invalid"
    answer = ack_for(intake, "auto", control_id="A1", now=NOW)
    assert answer.code == "AR"
    assert answer.ack is not None
    ack = ack_segments(answer.ack)
    assert str(ack["MSA.F2"]) == ""
    assert_no_phi(answer.ack)


# -- oversize ------------------------------------------------------------------------------


def test_oversize_with_readable_header_is_answered_from_it() -> None:
    prefix = msg()[:200]
    intake = assess_oversize(prefix, 20_000_000, POLICY)
    assert intake.outcome is Outcome.REJECT
    assert intake.error is not None
    assert intake.error.code == 104
    assert "20000000" in intake.error.reason
    assert str(POLICY.max_message_bytes) in intake.error.reason
    assert intake.payload_sha256 == hashlib.sha256(prefix).hexdigest()
    answer = ack_for(intake, "auto", control_id="A1", now=NOW)
    assert answer.code == "AR"
    assert answer.ack is not None
    ack = ack_segments(answer.ack)
    assert str(ack["MSA.F2"]) == "CTRL1"
    assert str(ack["ERR.F3.R1.C1"]) == "104"
    assert_no_phi(intake.error.reason, answer.ack)
    row = record(
        intake,
        payload=prefix,
        listener="t",
        peer="p",
        received_at=NOW,
        answer=answer,
        size=20_000_000,
    )
    assert row["size"] == 20_000_000
    assert row["raw_truncated"] is True
    assert row["status"] == "rejected"
    assert row["error_code"] == 104


def test_oversize_with_unreadable_prefix_gets_a_bare_reject() -> None:
    intake = assess_oversize(b"\x00" * 100, 50_000_000, POLICY)
    assert intake.header is None
    answer = ack_for(intake, "enhanced", control_id="A1", now=NOW)
    assert answer.code == "CR"
    assert answer.ack is not None
    assert b"104^Value too long^HL70357" in answer.ack


# -- storage failure -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "msh15", "code"),
    [("auto", "", "AR"), ("auto", "AL", "CR"), ("original", "AL", "AR"), ("enhanced", "", "CR")],
)
def test_storage_failure_rejects_so_the_sender_retries(
    mode: AckMode, msh15: str, code: str
) -> None:
    intake = assess(msg(msh15=msh15), POLICY)
    ack = ack_segments(storage_failure_ack(intake, mode, control_id="A9", now=NOW))
    assert str(ack["MSA.F1"]) == code
    assert str(ack["MSA.F2"]) == "CTRL1"
    assert str(ack["ERR.F3.R1.C1"]) == "207"
    assert "resend" in str(ack["ERR.F8"])


# -- dedup key -------------------------------------------------------------------------------


def _key(payload: bytes) -> str | None:
    return assess(payload, POLICY).dedup_key


def test_dedup_key_equal_for_same_sender_facility_and_control_id() -> None:
    a = _key(msg("C1", timestamp="20260101000000", body="PID|1||A\r"))
    b = _key(msg("C1", timestamp="20270202000000", mtype="SIU^S12", body="PID|1||B\r"))
    assert a is not None
    assert a == b


@pytest.mark.parametrize(
    "other",
    [
        {"control_id": "C2"},
        {"sender": "EHR2"},
        {"facility": "CLINIC2"},
    ],
)
def test_dedup_key_differs_when_msh3_msh4_or_msh10_differs(other: dict[str, str]) -> None:
    assert _key(msg("C1")) != _key(msg(**{"control_id": "C1", **other}))


def test_dedup_key_fields_cannot_run_into_each_other() -> None:
    a = parse_header(b"MSH|^~\\&|AB|C|R|H|1||ADT^A01|X1\r")
    b = parse_header(b"MSH|^~\\&|A|BC|R|H|1||ADT^A01|X1\r")
    c = parse_header(b"MSH|^~\\&|A|B|R|H|1||ADT^A01|CX1\r")
    d = parse_header(b"MSH|^~\\&|A|BC|R|H|1||ADT^A01|X1\r")
    assert len({dedup_key(a), dedup_key(b), dedup_key(c)}) == 3
    assert dedup_key(b) == dedup_key(d)


# -- metric label and stored row --------------------------------------------------------------


@pytest.mark.parametrize(
    ("mtype", "label"),
    [
        ("ORM^O01^ORM_O01", "ORM^O01"),
        ("ADT", "ADT"),
        ("ORM^o01", "ORM^invalid"),
        ("ORM^O01X", "ORM^invalid"),
        ("QQQ^Q01", "invalid"),
    ],
)
def test_type_label_is_bounded(mtype: str, label: str) -> None:
    assert assess(msg(mtype=mtype), POLICY).type_label == label


def test_record_of_an_accepted_message() -> None:
    payload = msg(charset="UNICODE UTF-8", version="2.4")
    intake = assess(payload, POLICY)
    answer = ack_for(intake, "auto", control_id="A1", now=NOW)
    received = NOW - timedelta(seconds=1)
    row = record(
        intake,
        payload=payload,
        listener="main",
        peer="10.0.0.9:5000",
        received_at=received,
        answer=answer,
    )
    assert row == {
        "received_at": received,
        "listener": "main",
        "peer": "10.0.0.9:5000",
        "raw": payload,
        "size": len(payload),
        "raw_truncated": False,
        "message_type": "ORM^O01^ORM_O01",
        "control_id": "CTRL1",
        "sending_application": "EHR",
        "sending_facility": "CLINIC",
        "receiving_application": "REFLOOP",
        "receiving_facility": "HUB",
        "version": "2.4",
        "charset": "UNICODE UTF-8",
        "dedup_key": intake.dedup_key,
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "status": "received",
        "ack_code": "AA",
        "ack": answer.ack,
        "error_code": None,
        "error": None,
        "duplicate_of": None,
    }


def test_record_without_ack_has_no_ack_code() -> None:
    intake = assess(msg(msh15="NE", msh16="AL"), POLICY)
    answer = ack_for(intake, "auto", control_id="A1", now=NOW, honour_accept_ack_type=True)
    assert answer == Answer("CA", None)
    row = record(intake, payload=msg(), listener="t", peer="p", received_at=NOW, answer=answer)
    assert row["ack_code"] is None
    assert row["ack"] is None


def test_record_of_unparseable_frame_has_no_header_fields() -> None:
    intake = assess(b"nonsense", POLICY)
    answer = ack_for(intake, "auto", control_id="A1", now=NOW)
    row = record(
        intake, payload=b"nonsense", listener="t", peer="p", received_at=NOW, answer=answer
    )
    assert row["message_type"] is None
    assert row["control_id"] is None
    assert row["charset"] is None
    assert row["status"] == "rejected"
    assert row["ack_code"] == "AR"
    assert row["error_code"] == 100


def test_local_z_message_types_are_accepted_and_labelled() -> None:
    intake = assess(msg(mtype="ZRF^Z01"), POLICY)
    assert intake.outcome is Outcome.ACCEPT
    assert intake.type_label == "Z^local"  # local types share one metric label
