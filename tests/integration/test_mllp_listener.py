"""The MLLP listener over real sockets, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text

from engine.protocol.mllp import encode
from engine.store.database import open_engine
from engine.store.schema import messages
from tests.conftest import running
from tests.helpers import RawMllp, ingest_status, msg, segments, wait_for


def rows(url: str) -> list:
    eng = open_engine(url)
    with eng.connect() as conn:
        out = list(conn.execute(select(messages).order_by(messages.c.id)))
    eng.dispose()
    return out


def sample(daemon, name: str, **labels: str) -> float:
    value = daemon.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def listener(**kw):
    return [{"name": "test", "host": "127.0.0.1", "port": 0, **kw}]


async def test_pipelined_frames_in_one_write_are_answered_in_order(config_for, upgraded_url):
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        await peer.send_raw(b"".join(encode(msg(f"P{i}")) for i in range(5)))
        acks = [await peer.read_frame() for _ in range(5)]
        await peer.close()
    assert [segments(a)["MSA"][2] for a in acks] == [f"P{i}" for i in range(5)]
    assert [r.control_id for r in rows(upgraded_url)] == [f"P{i}" for i in range(5)]


async def test_frame_split_across_writes_byte_by_byte(config_for, upgraded_url):
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        for byte in encode(msg("SPLIT")):
            await peer.send_raw(bytes([byte]))
        ack = await peer.read_frame()
        await peer.close()
    assert segments(ack)["MSA"][1:3] == ["AA", "SPLIT"]
    assert rows(upgraded_url)[0].raw == msg("SPLIT")


async def test_junk_outside_frames_is_discarded_counted_and_does_not_lose_the_next_frame(
    config_for, upgraded_url
):
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        await peer.send_raw(b"\r\nnoise" + encode(msg("AFTERJUNK")) + b"\n")
        ack = await peer.read_frame()
        await peer.send_raw(encode(msg("NEXT")))
        ack2 = await peer.read_frame()
        await peer.close()
        junk = sample(d, "refloop_mllp_junk_bytes_total", listener="test")
        errors = sample(
            d, "refloop_mllp_framing_errors_total", listener="test", reason="outside_frame"
        )
    assert segments(ack)["MSA"][2] == "AFTERJUNK"
    assert segments(ack2)["MSA"][2] == "NEXT"
    assert junk == 8  # "\r\nnoise" + the trailing "\n"
    assert errors == 2
    assert [r.control_id for r in rows(upgraded_url)] == ["AFTERJUNK", "NEXT"]


async def test_oversize_frame_gets_ar_104_and_the_connection_closes(config_for, upgraded_url):
    cfg = config_for(listeners=listener(max_message_bytes=2048))
    big = msg("BIG", body="OBX|1|TX|||" + "x" * 70_000 + "\r")  # beyond the kept 64 KiB
    async with running(cfg) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        await peer.send_raw(encode(big))
        ack = await peer.read_frame()
        assert await peer.closed()
        await peer.close()
        oversize = sample(
            d, "refloop_mllp_framing_errors_total", listener="test", reason="oversize"
        )
    seg = segments(ack)
    assert seg["MSA"][1:3] == ["AR", "BIG"]
    assert seg["ERR"][3].startswith("104^")
    assert "max_message_bytes" in seg["ERR"][8]
    assert oversize == 1
    [row] = rows(upgraded_url)
    assert row.status == "rejected"
    assert row.raw_truncated is True
    assert row.size == len(big)
    assert big.startswith(row.raw)


async def test_idle_connection_is_closed(config_for):
    cfg = config_for(listeners=listener(idle_timeout_seconds=0.3))
    async with running(cfg) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        assert await peer.closed(timeout=5)
        await peer.close()
        idle = sample(
            d, "refloop_mllp_framing_errors_total", listener="test", reason="idle_timeout"
        )
    assert idle == 1


async def test_connections_beyond_max_are_refused_and_counted(config_for):
    cfg = config_for(listeners=listener(max_connections=2))
    async with running(cfg) as d:
        port = d.listeners[0].port
        first = await RawMllp.connect(port)
        second = await RawMllp.connect(port)
        await wait_for(lambda: sample(d, "refloop_mllp_connections", listener="test") == 2)
        third = await RawMllp.connect(port)
        assert await third.closed()
        refused = sample(
            d, "refloop_mllp_connections_refused_total", listener="test", reason="max_connections"
        )
        ack = await first.send(msg("STILLOK"))
        for p in (first, second, third):
            await p.close()
    assert refused == 1
    assert segments(ack)["MSA"][1] == "AA"


async def test_peer_outside_allowed_cidrs_is_refused(config_for, upgraded_url):
    cfg = config_for(listeners=listener(allowed_cidrs=["10.0.0.0/8"]))
    async with running(cfg) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        await peer.send_raw(encode(msg("NOPE")))
        assert await peer.closed()
        await peer.close()
        refused = sample(
            d, "refloop_mllp_connections_refused_total", listener="test", reason="cidr"
        )
    assert refused == 1
    assert rows(upgraded_url) == []


@pytest.mark.parametrize(
    ("mode", "honour", "msh15", "msh16", "expected"),
    [
        ("auto", False, "", "", "AA"),
        ("auto", False, "AL", "NE", "CA"),
        ("auto", False, "", "AL", "CA"),
        ("auto", False, "NE", "NE", "CA"),  # never silence, unless told to honour MSH-15
        ("auto", True, "ER", "AL", None),
        ("auto", True, "NE", "NE", None),
        ("auto", True, "SU", "NE", "CA"),
        ("original", True, "NE", "NE", "AA"),
        ("enhanced", False, "", "", "CA"),
    ],
)
async def test_ack_mode(config_for, upgraded_url, mode, honour, msh15, msh16, expected):
    cfg = config_for(listeners=listener(ack_mode=mode, honour_accept_ack_type=honour))
    async with running(cfg) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        await peer.send_raw(encode(msg("MODE", msh15=msh15, msh16=msh16)))
        if expected is None:
            # No accept ACK wanted: the message must still be stored.
            await wait_for(lambda: rows(upgraded_url))
            await peer.send_raw(encode(msg("PROBE")))
            ack = await peer.read_frame()
            assert segments(ack)["MSA"][2] == "PROBE"
        else:
            ack = await peer.read_frame()
            assert segments(ack)["MSA"][1:3] == [expected, "MODE"]
        await peer.close()
    assert ingest_status(rows(upgraded_url)[0].status) == "received"


async def test_unparseable_frame_gets_ar_with_reason_and_is_stored(config_for, upgraded_url):
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        ack = await peer.send(b"this is not hl7 at all")
        bad_enc = await peer.send(b"MSH|^^\\&|A|B|C|D|2026||ADT^A01|X1|P|2.5\r")
        await peer.close()
    seg = segments(ack)
    assert seg["MSA"][1] == "AR"
    assert seg["ERR"][3].startswith("100^")
    assert "MSH" in seg["ERR"][8]
    assert segments(bad_enc)["MSA"][1] == "AR"
    stored = rows(upgraded_url)
    assert [r.status for r in stored] == ["rejected", "rejected"]
    assert stored[0].raw == b"this is not hl7 at all"


async def test_unknown_message_type_gets_ar_200(config_for, upgraded_url):
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        ack = await peer.send(msg("WEIRD", mtype="QQQ^Q01"))
        await peer.close()
    seg = segments(ack)
    assert seg["MSA"][1:3] == ["AR", "WEIRD"]
    assert seg["ERR"][3].startswith("200^")
    assert rows(upgraded_url)[0].status == "rejected"


async def test_charsets_decode_per_msh18_and_undecodable_gets_ae_but_is_stored(
    config_for, upgraded_url
):
    latin = msg("LAT", charset="8859/1", body="PID|1||1||M\xfcLLER^J\r").replace(
        b"M\xc3\xbcLLER", "M\xfcLLER".encode("latin-1")
    )
    broken = msg("BAD", body="PID|1||1||X^Y\r") + b"NTE|1||\xff\xfe\r"
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        ack_latin = await peer.send(latin)
        ack_broken = await peer.send(broken)
        await peer.close()
    assert segments(ack_latin)["MSA"][1] == "AA"
    seg = segments(ack_broken)
    assert seg["MSA"][1:3] == ["AE", "BAD"]
    assert seg["ERR"][3].startswith("102^")
    stored = {r.control_id: r for r in rows(upgraded_url)}
    assert stored["LAT"].raw == latin
    assert stored["BAD"].raw == broken  # byte for byte, untouched
    assert stored["BAD"].status == "error"


async def test_lf_terminators_accepted_unless_strict(config_for):
    lf = msg("LF").replace(b"\r", b"\n")
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        ack = await peer.send(lf)
        await peer.close()
    assert segments(ack)["MSA"][1] == "AA"
    async with running(config_for(listeners=listener(strict_segment_terminators=True))) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        strict = await peer.send(msg("LF2").replace(b"\r", b"\n"))
        ok = await peer.send(msg("CR2"))
        await peer.close()
    assert segments(strict)["MSA"][1] == "AR"
    assert segments(ok)["MSA"][1] == "AA"


async def test_duplicate_gets_the_same_answer_and_no_new_effect(config_for, upgraded_url):
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        first = await peer.send(msg("DUP1"))
        again = await peer.send(msg("DUP1"))
        other_sender = await peer.send(msg("DUP1", sender="OTHER"))
        await peer.close()
        dup_count = sample(
            d,
            "refloop_mllp_messages_total",
            listener="test",
            message_type="ORM^O01",
            outcome="duplicate",
        )
    assert again == first
    assert segments(other_sender)["MSA"][1] == "AA"
    assert other_sender != first
    stored = rows(upgraded_url)
    assert [ingest_status(r.status) for r in stored] == ["received", "duplicate", "received"]
    assert stored[1].duplicate_of == stored[0].id
    assert stored[1].dedup_key is None
    assert dup_count == 1


async def test_duplicate_window_zero_treats_a_resend_as_new(config_for, upgraded_url):
    cfg = config_for(listeners=listener(duplicate_window_seconds=0))
    async with running(cfg) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        await peer.send(msg("W1"))
        await peer.send(msg("W1"))
        await peer.close()
    assert [ingest_status(r.status) for r in rows(upgraded_url)] == ["received", "received"]


async def test_storage_failure_is_answered_ar_207_and_recovers(config_for, upgraded_url):
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        eng = open_engine(upgraded_url)
        with eng.begin() as conn:
            conn.execute(text("ALTER TABLE messages RENAME TO messages_away"))
        try:
            nak = await peer.send(msg("DOWN1"))
        finally:
            with eng.begin() as conn:
                conn.execute(text("ALTER TABLE messages_away RENAME TO messages"))
            eng.dispose()
        ok = await peer.send(msg("UP1"))
        await peer.close()
        errors = sample(
            d,
            "refloop_mllp_messages_total",
            listener="test",
            message_type="ORM^O01",
            outcome="storage_error",
        )
    seg = segments(nak)
    assert seg["MSA"][1:3] == ["AR", "DOWN1"]
    assert seg["ERR"][3].startswith("207^")
    assert segments(ok)["MSA"][1:3] == ["AA", "UP1"]
    assert [r.control_id for r in rows(upgraded_url)] == ["UP1"]
    assert errors == 1


async def test_many_connections_at_once_all_stored_before_ack(config_for, upgraded_url):
    async with running(config_for()) as d:
        port = d.listeners[0].port

        async def client(n: int) -> list[bytes]:
            peer = await RawMllp.connect(port)
            acks = [await peer.send(msg(f"C{n}-{i}")) for i in range(10)]
            await peer.close()
            return acks

        results = await asyncio.gather(*(client(n) for n in range(8)))
    acked = {segments(a)["MSA"][2] for acks in results for a in acks}
    assert len(acked) == 80
    assert {r.control_id for r in rows(upgraded_url)} == acked


async def test_the_same_message_from_many_connections_at_once_is_stored_once(
    config_for, upgraded_url
):
    async with running(config_for()) as d:
        port = d.listeners[0].port
        peers = [await RawMllp.connect(port) for _ in range(8)]
        for p in peers:
            await p.send_raw(encode(msg("RACE")))
        acks = [await p.read_frame() for p in peers]
        for p in peers:
            await p.close()
    assert len(set(acks)) == 1  # everyone got the original's ACK, byte for byte
    stored = rows(upgraded_url)
    originals = [r for r in stored if ingest_status(r.status) == "received"]
    assert len(originals) == 1
    assert sorted(ingest_status(r.status) for r in stored) == ["duplicate"] * 7 + ["received"]
    assert {r.duplicate_of for r in stored if r.status == "duplicate"} == {originals[0].id}


async def test_same_control_id_with_other_content_is_rejected_not_swallowed(
    config_for, upgraded_url
):
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        first = await peer.send(msg("REUSED", mtype="ADT^A01"))
        restamped = await peer.send(
            msg("REUSED", mtype="ADT^A01").replace(b"20261123101500", b"20261123101600", 1)
        )
        other = await peer.send(msg("REUSED", mtype="ORM^O01"))
        await peer.close()
    assert segments(first)["MSA"][1] == "AA"
    assert restamped == first  # only MSH-7 differs: a resend, answered as the original
    seg = segments(other)
    assert seg["MSA"][1:3] == ["AR", "REUSED"]
    assert seg["ERR"][3].startswith("207^")
    assert seg["ERR"][5].startswith("102^")
    stored = rows(upgraded_url)
    assert [ingest_status(r.status) for r in stored] == ["received", "duplicate", "rejected"]
    assert stored[2].duplicate_of == stored[0].id
    assert stored[2].raw == msg("REUSED", mtype="ORM^O01")


async def test_nul_bytes_in_header_fields_are_stored_on_both_databases(config_for, upgraded_url):
    payload = msg("NUL\x00ID", sender="E\x00HR")
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        ack = await peer.send(payload)
        await peer.close()
    assert segments(ack)["MSA"][1] == "AA"
    [row] = rows(upgraded_url)
    assert row.raw == payload
    assert "\x00" not in row.control_id


@pytest.mark.parametrize(
    ("charset", "code"),
    [("ISO-8859-1", "AA"), ("windows-1252", "AA"), ("UNICODE UTF-16", "AE")],
)
async def test_vendor_charset_spellings(config_for, charset, code):
    async with running(config_for()) as d:
        peer = await RawMllp.connect(d.listeners[0].port)
        ack = await peer.send(msg("CS", charset=charset))
        await peer.close()
    assert segments(ack)["MSA"][1] == code
