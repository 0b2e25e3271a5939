"""Interoperability with third-party MLLP / HL7 v2 implementations over real sockets.

The peers are real libraries, not stand-ins: python-hl7 (``hl7.mllp`` asyncio streams,
``hl7.parse``, ``Message.create_ack``) and hl7apy (a validating parser and builder).

* python-hl7's client sends to an in-process refloop daemon and parses every ACK;
* hl7apy parses refloop's ACKs at STRICT validation, and a message hl7apy built is stored
  byte for byte;
* ``refloop send`` talks to python-hl7's server, which answers with its own ACKs; an ACK
  naming another control id (foreign or late) is a failure, never a success.

Synthetic messages and shared/corpus/hl7v2 files only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import hl7
import pytest
from click.testing import CliRunner, Result
from hl7.mllp import open_hl7_connection, start_hl7_server
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message as ApyMessage
from hl7apy.parser import parse_message, parse_segment
from sqlalchemy import select

from engine.config import Config
from engine.edges import cli
from engine.edges.mllp_client import MllpClient, read_messages
from engine.store.database import open_engine, upgrade
from engine.store.schema import messages
from tests.conftest import running
from tests.helpers import CORPUS, make_config, msg

ORM_FILE = CORPUS / "ORM_O01" / "rubyhl7__lotsunknowns.hl7"  # v2.3.1, unknown segments
ORM_ENHANCED_FILE = CORPUS / "ORM_O01" / "oie__test-hl7-input.hl7"  # MSH-15=AL, MSH-16=NE
SIU_FILE = CORPUS / "SIU_S12" / "dcm4che__SIU_S12-NewAppointmentBooking.hl7"  # 8859/1
SIU_BATCH_FILE = CORPUS / "SIU_S12" / "oie__filereader_batch01.hl7"  # three messages

needs_corpus = pytest.mark.skipif(
    not all(p.is_file() for p in (ORM_FILE, ORM_ENHANCED_FILE, SIU_FILE, SIU_BATCH_FILE)),
    reason="shared/corpus/hl7v2 is not beside the repo",
)

IO_TIMEOUT = 10.0


def corpus_one(path: Path) -> bytes:
    [payload] = read_messages(path)
    return payload


def stored_raw(url: str) -> list[bytes]:
    eng = open_engine(url)
    with eng.connect() as conn:
        out = [r.raw for r in conn.execute(select(messages.c.raw).order_by(messages.c.id))]
    eng.dispose()
    return out


def field(message: hl7.Message, segment: str, index: int) -> str:
    """python-hl7's view of one field (MSH-n counts MSH-1, the field separator)."""
    return str(message.segment(segment)(index))


def wants_enhanced(message: hl7.Message) -> bool:
    return bool(field(message, "MSH", 15) or field(message, "MSH", 16))


def assert_python_hl7_ack(ack: hl7.Message, sent: hl7.Message) -> None:
    expected = "CA" if wants_enhanced(sent) else "AA"
    control_id = field(sent, "MSH", 10)
    assert field(ack, "MSH", 9).startswith("ACK"), control_id
    assert field(ack, "MSA", 1) == expected, control_id
    assert field(ack, "MSA", 2) == control_id
    # The ACK comes from whom the message was for, and goes back to whom sent it.
    assert (field(ack, "MSH", 3), field(ack, "MSH", 4)) == (
        field(sent, "MSH", 5),
        field(sent, "MSH", 6),
    )
    assert (field(ack, "MSH", 5), field(ack, "MSH", 6)) == (
        field(sent, "MSH", 3),
        field(sent, "MSH", 4),
    )
    assert field(ack, "MSH", 12) == field(sent, "MSH", 12)


def interop_batch() -> list[bytes]:
    return [
        msg("PYHL7-1"),
        msg("PYHL7-2", mtype="ADT^A08^ADT_A01", sender="REGAPP", facility="WARD7"),
        corpus_one(ORM_FILE),
        corpus_one(SIU_FILE),
        corpus_one(ORM_ENHANCED_FILE),
        msg("PYHL7-3", version="2.4", msh15="AL", msh16="AL"),
    ]


# -- 1. python-hl7's asyncio client -> refloop -----------------------------------------


@needs_corpus
async def test_python_hl7_client_reads_and_parses_every_ack(config_for, upgraded_url):
    batch = [hl7.parse(payload.decode("ascii")) for payload in interop_batch()]
    acks: list[hl7.Message] = []
    async with running(config_for()) as d:
        reader, writer = await open_hl7_connection("127.0.0.1", d.listeners[0].port)
        try:
            for message in batch:
                writer.writemessage(message)
                await writer.drain()
                acks.append(await asyncio.wait_for(reader.readmessage(), IO_TIMEOUT))
        finally:
            writer.close()
            await writer.wait_closed()
    assert len(acks) == len(batch)
    for ack, sent in zip(acks, batch, strict=True):
        assert_python_hl7_ack(ack, sent)
    assert [field(a, "MSA", 1) for a in acks] == ["AA", "AA", "AA", "AA", "CA", "CA"]
    # What python-hl7 put on the wire is what refloop kept, byte for byte.
    assert stored_raw(upgraded_url) == [str(m).encode("ascii") for m in batch]


@needs_corpus
async def test_python_hl7_client_pipelined_burst_gets_acks_in_order(config_for, upgraded_url):
    batch = [hl7.parse(msg(f"BURST-{i}").decode("ascii")) for i in range(8)]
    batch.append(hl7.parse(corpus_one(SIU_FILE).decode("ascii")))
    async with running(config_for()) as d:
        reader, writer = await open_hl7_connection("127.0.0.1", d.listeners[0].port)
        try:
            for message in batch:  # every frame before reading any answer
                writer.writemessage(message)
            await writer.drain()
            acks = [
                await asyncio.wait_for(reader.readmessage(), IO_TIMEOUT) for _ in range(len(batch))
            ]
        finally:
            writer.close()
            await writer.wait_closed()
    for ack, sent in zip(acks, batch, strict=True):
        assert_python_hl7_ack(ack, sent)
    assert stored_raw(upgraded_url) == [str(m).encode("ascii") for m in batch]


# -- 2. hl7apy: strict parsing of refloop's ACKs, and an hl7apy-built message ------------


def strict_parse(raw: bytes):
    """hl7apy at STRICT validation, then a full structural validate()."""
    ack = parse_message(raw.decode("ascii"), validation_level=VALIDATION_LEVEL.STRICT)
    assert ack.validate() is True
    return ack


@needs_corpus
async def test_hl7apy_parses_refloop_acks_at_strict_validation(config_for):
    undecodable = msg("APY-AE", body="PID|1||1||X^Y\r") + b"NTE|1||\xff\xfe\r"
    cases = [
        # (payload, MSA-1, MSA-2, table 0357 code in ERR or None)
        (msg("APY-AA"), "AA", "APY-AA", None),
        (msg("APY-CA", msh15="AL", msh16="NE"), "CA", "APY-CA", None),
        (msg("APY-AR", mtype="QQQ^Q01"), "AR", "APY-AR", "200"),
        (undecodable, "AE", "APY-AE", "102"),
        (corpus_one(ORM_FILE), "AA", "241104", None),
        (corpus_one(SIU_FILE), "AA", "1001127", None),
    ]
    raws: list[bytes] = []
    async with (
        running(config_for()) as d,
        MllpClient("127.0.0.1", d.listeners[0].port, timeout=IO_TIMEOUT) as client,
    ):
        for payload, *_ in cases:
            raws.append((await client.send(payload)).raw)
    for raw, (payload, code, control_id, err_code) in zip(raws, cases, strict=True):
        ack = strict_parse(raw)
        assert ack.name == "ACK", raw
        assert ack.msa.msa_1.value == code, raw
        assert ack.msa.msa_2.value == control_id, raw
        assert ack.msh.msh_9.to_er7().startswith("ACK"), raw
        # hl7apy's reading of the sent MSH (the whole message may hold segments unknown
        # to hl7apy, like the corpus ORM's OMG/WTF/BBQ).
        sent = parse_segment(payload.split(b"\r")[0].decode("latin-1"), version=ack.version)
        assert ack.msh.msh_3.to_er7() == sent.msh_5.to_er7()
        assert ack.msh.msh_4.to_er7() == sent.msh_6.to_er7()
        assert ack.msh.msh_12.to_er7() == sent.msh_12.to_er7()
        if err_code is None:
            assert not ack.children.get("ERR"), raw
            continue
        assert ack.msa.msa_3.value, raw  # a reason a person can act on
        if ack.version >= "2.5":
            assert ack.err.err_3.cwe_1.value == err_code
            assert ack.err.err_4.value == "E"
            assert ack.err.err_8.value
        else:  # v2.1-2.4: ERR-1 is ELD, code in its 4th component
            assert ack.err.err_1.eld_4.ce_1.to_er7() == err_code


@pytest.fixture
def sqlite_config(sqlite_url: str) -> Config:
    """For ACK-format checks, which do not depend on the database backend."""
    eng = open_engine(sqlite_url)
    upgrade(eng)
    eng.dispose()
    return make_config(sqlite_url)


@pytest.mark.parametrize(
    "version",
    [
        "2.3.1",
        "2.4",
        "2.5",
        "2.5.1",
        "2.6",
        "2.7",
        "2.8",
    ],
)
async def test_hl7apy_strict_accepts_ack_and_nak_in_every_version(sqlite_config, version):
    accept = msg(f"V{version}-OK", version=version)
    reject = msg(f"V{version}-REJ", version=version, mtype="QQQ^Q01")
    async with (
        running(sqlite_config) as d,
        MllpClient("127.0.0.1", d.listeners[0].port, timeout=IO_TIMEOUT) as client,
    ):
        ok = await client.send(accept)
        nak = await client.send(reject)
    assert (ok.code, nak.code) == ("AA", "AR")
    for receipt in (ok, nak):
        ack = strict_parse(receipt.raw)
        assert ack.version == version
        assert ack.msa.msa_1.value == receipt.code
        assert ack.msa.msa_2.value == receipt.control_id


async def test_message_built_by_hl7apy_is_acked_and_stored_byte_for_byte(config_for, upgraded_url):
    built = ApyMessage("ORM_O01", version="2.5.1")
    built.msh.msh_3 = "APYAPP"
    built.msh.msh_4 = "APYFAC"
    built.msh.msh_5 = "REFLOOP"
    built.msh.msh_6 = "HUB"
    built.msh.msh_7 = "20261123101500"
    built.msh.msh_9 = "ORM^O01^ORM_O01"
    built.msh.msh_10 = "APY-BUILT-1"
    built.msh.msh_11 = "P"
    built.msh.msh_12 = "2.5.1"
    built.add_group("ORM_O01_PATIENT")
    built.orm_o01_patient.pid.pid_3 = "99999^^^HOSP^MR"
    built.orm_o01_patient.pid.pid_5 = "TESTPATIENT^BETA"
    order = built.add_group("ORM_O01_ORDER")
    order.orc.orc_1 = "NW"
    order.orc.orc_2 = "PLC-APY"
    assert built.validate() is True
    # Exactly the payload hl7apy would frame for MLLP itself.
    frame = built.to_mllp().encode("ascii")
    assert frame.startswith(b"\x0b")
    assert frame.endswith(b"\x1c\r")
    payload = frame[1:-2]

    async with (
        running(config_for()) as d,
        MllpClient("127.0.0.1", d.listeners[0].port, timeout=IO_TIMEOUT) as client,
    ):
        receipt = await client.send(payload)
    assert receipt.ok
    assert (receipt.code, receipt.control_id) == ("AA", "APY-BUILT-1")
    ack = strict_parse(receipt.raw)
    assert ack.msa.msa_2.value == "APY-BUILT-1"
    assert (ack.msh.msh_3.value, ack.msh.msh_4.value) == ("REFLOOP", "HUB")
    assert (ack.msh.msh_5.value, ack.msh.msh_6.value) == ("APYAPP", "APYFAC")
    assert stored_raw(upgraded_url) == [payload]


# -- 3. refloop send -> python-hl7's server ----------------------------------------------


Reply = Callable[[hl7.Message, list[hl7.Message]], list[hl7.Message]]


def reject_rej_prefix(message: hl7.Message, _seen: list[hl7.Message]) -> list[hl7.Message]:
    """python-hl7's own ACK: AA, or AR for MSH-10 starting with REJ."""
    if field(message, "MSH", 10).startswith("REJ"):
        ack = message.create_ack("AR")
        ack.segment("MSA").assign_field("rejected by the test peer", 3)
        return [ack]
    return [message.create_ack("AA")]


def foreign_control_id(message: hl7.Message, _seen: list[hl7.Message]) -> list[hl7.Message]:
    """An AA that acknowledges some other message."""
    ack = message.create_ack("AA")
    ack.segment("MSA").assign_field("NOT-" + field(message, "MSH", 10), 2)
    return [ack]


def late_duplicate(message: hl7.Message, seen: list[hl7.Message]) -> list[hl7.Message]:
    """The first message is acknowledged twice: the second copy arrives, late, where the
    answer to the next message is expected."""
    ack = message.create_ack("AA")
    return [ack, message.create_ack("AA")] if len(seen) == 1 else [ack]


@contextlib.asynccontextmanager
async def python_hl7_listener(reply: Reply) -> AsyncIterator[tuple[int, list[hl7.Message]]]:
    """python-hl7's MLLP server on a free port in this loop; yields (port, received)."""
    received: list[hl7.Message] = []
    handlers: list[asyncio.Task[None]] = []

    async def on_connection(reader, writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            while True:
                message = await reader.readmessage()
                received.append(message)
                for ack in reply(message, received):
                    writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client is done
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await start_hl7_server(on_connection, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()
        if handlers:
            await asyncio.wait_for(asyncio.gather(*handlers), IO_TIMEOUT)


async def refloop_send(port: int, *files: Path) -> Result:
    args = ["send", *map(str, files), "--port", str(port), "--timeout", str(IO_TIMEOUT)]
    return await asyncio.to_thread(CliRunner().invoke, cli.main, args)


def send_lines(result: Result, *names: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.split(":", 1)[0] in set(names)]


@needs_corpus
async def test_refloop_send_to_python_hl7_server_all_accepted(tmp_path):
    batch = tmp_path / "batch.hl7"
    batch.write_bytes(msg("OK-1") + b"\n" + msg("OK-2", mtype="SIU^S12^SIU_S12"))
    async with python_hl7_listener(reject_rej_prefix) as (port, received):
        result = await refloop_send(port, batch, SIU_FILE, SIU_BATCH_FILE)
    assert result.exit_code == 0, result.output
    assert send_lines(result, batch.name, SIU_FILE.name, SIU_BATCH_FILE.name) == [
        "batch.hl7: OK-1 AA",
        "batch.hl7: OK-2 AA",
        f"{SIU_FILE.name}: 1001127 AA",
        f"{SIU_BATCH_FILE.name}: 24916560 AA",
        f"{SIU_BATCH_FILE.name}: 24916579 AA",
        f"{SIU_BATCH_FILE.name}: 24916597 AA",
    ]
    assert result.stderr == ""
    # The third-party server saw exactly the messages in the files, in order.
    expected = [*read_messages(batch), *read_messages(SIU_FILE), *read_messages(SIU_BATCH_FILE)]
    assert [str(m).encode("ascii") for m in received] == expected


async def test_refloop_send_reports_python_hl7_ar_and_exits_1(tmp_path):
    batch = tmp_path / "mixed.hl7"
    batch.write_bytes(b"\n".join([msg("OK-1"), msg("REJ-2"), msg("OK-3")]))
    async with python_hl7_listener(reject_rej_prefix) as (port, received):
        result = await refloop_send(port, batch)
    assert result.exit_code == 1, result.output
    assert send_lines(result, batch.name) == [
        "mixed.hl7: OK-1 AA",
        "mixed.hl7: REJ-2 AR rejected by the test peer",
        "mixed.hl7: OK-3 AA",
    ]
    assert "1 of 3 messages were not accepted" in result.stderr
    assert [field(m, "MSH", 10) for m in received] == ["OK-1", "REJ-2", "OK-3"]


async def test_refloop_send_treats_an_ack_for_another_control_id_as_failure(tmp_path):
    batch = tmp_path / "foreign.hl7"
    batch.write_bytes(msg("F-1") + b"\n" + msg("F-2"))
    async with python_hl7_listener(foreign_control_id) as (port, received):
        result = await refloop_send(port, batch)
    assert result.exit_code != 0, result.output
    assert send_lines(result, batch.name) == [
        "foreign.hl7: F-1 ?? ACK names control id 'NOT-F-1', not ours",
        "foreign.hl7: F-2 ?? ACK names control id 'NOT-F-2', not ours",
    ]
    assert "2 of 2 messages were not accepted" in result.stderr
    assert len(received) == 2


async def test_refloop_send_treats_a_late_ack_as_failure(tmp_path):
    batch = tmp_path / "late.hl7"
    batch.write_bytes(msg("L-1") + b"\n" + msg("L-2"))
    async with python_hl7_listener(late_duplicate) as (port, _received):
        result = await refloop_send(port, batch)
    assert result.exit_code != 0, result.output
    # The stale second ACK for L-1 must not count as L-2's answer.
    assert send_lines(result, batch.name) == [
        "late.hl7: L-1 AA",
        "late.hl7: L-2 ?? ACK names control id 'L-1', not ours",
    ]
    assert "1 of 2 messages were not accepted" in result.stderr


@pytest.mark.parametrize("version", ["2.2", "2.3"])
async def test_acks_before_231_have_a_two_part_msh9(sqlite_config, version):
    # hl7apy has no ACK structures for v2.2/2.3 at all, so python-hl7 reads these.
    async with (
        running(sqlite_config) as d,
        MllpClient("127.0.0.1", d.listeners[0].port, timeout=IO_TIMEOUT) as client,
    ):
        ok = await client.send(msg(f"V{version}-OK", version=version))
    ack = hl7.parse(ok.raw.decode("ascii"))
    assert str(ack.segment("MSH")[9]) == "ACK^O01"
    assert str(ack.segment("MSA")[1]) == "AA"
