"""The MLLP channel against a real MLLP peer (python-hl7's asyncio server) on loopback.

Every fault is the peer's real behaviour on a real socket (tests/peers/mllp_peer.py):
late, foreign, garbage and half answers, closes, restarts, TLS and mutual TLS with a
test PKI. Reconnect backoff runs on an injected clock, so no test waits it out.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from channels import registry
from channels.base import (
    HL7V2,
    Channel,
    ChannelConfigError,
    ChannelContext,
    ChannelError,
    Envelope,
    PermanentError,
    Receipt,
    RetryableError,
)
from channels.mllp import parse_endpoint, read_ack
from engine.protocol.mllp import Frame, FrameDecoder, encode
from tests.channels.contract import SECRET_MARKER, ChannelContract, Received, envelope
from tests.helpers import msg
from tests.integration.certs import Pki, make_pki
from tests.peers.mllp_peer import Fault, MllpPeer, Reply, server_tls

MakeChannel = Callable[..., Channel]


def hl7(control_id: str, note: str = "Referral for cardiology") -> bytes:
    return msg(
        control_id,
        mtype="REF^I12^REF_I12",
        body=f"PID|1||12345^^^HOSP^MR||TESTPATIENT^ALPHA\rNTE|1||{note}\r",
    )


def env(control_id: str, *, endpoint: str = "", note: str = "Referral for cardiology") -> Envelope:
    return envelope(
        hl7(control_id, note),
        HL7V2,
        endpoint=endpoint,
        metadata={"control_id": control_id},
    )


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def peer() -> AsyncIterator[MllpPeer]:
    async with MllpPeer() as p:
        yield p


@pytest.fixture
def dead_port() -> Iterator[socket.socket]:
    """A port that is bound but not listening: connecting to it is refused, reliably."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s
    s.close()


@pytest.fixture
async def make_channel(tmp_path: Path) -> AsyncIterator[MakeChannel]:
    built: list[Channel] = []

    def make(
        port: int,
        *,
        clock: Callable[[], float] | None = None,
        base_dir: Path | None = None,
        **settings: Any,
    ) -> Channel:
        raw = {
            "type": "mllp",
            "host": "127.0.0.1",
            "port": port,
            "ack_timeout_seconds": 5,
            "connect_timeout_seconds": 5,
            **settings,
        }
        context = ChannelContext(base_dir=base_dir or tmp_path, clock=clock or time.time)
        channel = registry.build("to-peer", raw, context)
        built.append(channel)
        return channel

    yield make
    for channel in built:
        await channel.aclose()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TestMllpContract(ChannelContract):
    type_name = "mllp"

    @pytest.fixture
    def contract_channel(self, peer: MllpPeer, make_channel: MakeChannel) -> Channel:
        return make_channel(peer.port)

    @pytest.fixture
    def contract_received(self, peer: MllpPeer) -> Received:
        return peer.wait_for

    @pytest.fixture
    def contract_down_channel(self, dead_port: socket.socket, make_channel: MakeChannel) -> Channel:
        return make_channel(dead_port.getsockname()[1])

    @pytest.fixture
    def contract_payload(self) -> tuple[bytes, str]:
        return hl7("RL00000001"), HL7V2


# -- what the peer answered -------------------------------------------------------------


async def test_receipt_names_msa2_and_the_connection_is_reused(
    peer: MllpPeer, make_channel: MakeChannel
) -> None:
    channel = make_channel(peer.port)
    first = await channel.send(env("C1"))
    second = await channel.send(env("C2"))
    assert first == Receipt(peer_reference="C1", detail="ACK AA")
    assert second.peer_reference == "C2"
    assert await peer.wait_for(2) == [hl7("C1"), hl7("C2")]
    assert peer.connections == 1


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        ("AA", Receipt),
        ("CA", Receipt),
        ("AE", RetryableError),
        ("CE", RetryableError),
        ("AR", PermanentError),
        ("CR", PermanentError),
        ("ZZ", RetryableError),  # outside table 0008: not a success
    ],
)
async def test_ack_codes(
    peer: MllpPeer, make_channel: MakeChannel, code: str, outcome: type[Receipt | ChannelError]
) -> None:
    channel = make_channel(peer.port)
    peer.script(Reply(code=code, error_code="207", text=f"rejected {SECRET_MARKER}"))
    if not issubclass(outcome, ChannelError):
        receipt = await channel.send(env("K1"))
        assert receipt == Receipt(peer_reference="K1", detail=f"ACK {code}")
    else:
        with pytest.raises(outcome) as caught:
            await channel.send(env("K1"))
        assert caught.value.reason == f"ACK {code} (ERR-3 207)"
        assert SECRET_MARKER not in str(caught.value)
    # The peer answered in step, so the same connection carries the next message.
    assert (await channel.send(env("K2"))).peer_reference == "K2"
    assert peer.connections == 1


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.WRONG_CONTROL_ID, "ACK for another message (MSA-2 is not F1"),
        (Fault.GARBAGE, "not MLLP-framed"),
        (Fault.NOT_ACK, "not an HL7 ACK"),
        (Fault.HALF_FRAME, "closed mid-ACK"),
        (Fault.CLOSE, "closed without an ACK"),
        (Fault.SILENT, "no ACK within 0.3s"),
    ],
)
async def test_a_bad_answer_is_retryable_and_the_next_send_uses_a_fresh_connection(
    peer: MllpPeer, make_channel: MakeChannel, fault: Fault, reason: str
) -> None:
    channel = make_channel(peer.port, ack_timeout_seconds=0.3)
    peer.script(Reply(fault=fault))
    with pytest.raises(RetryableError) as caught:
        await channel.send(env("F1"))
    assert reason in caught.value.reason
    assert "TESTPATIENT" not in caught.value.reason
    receipt = await channel.send(env("F2"))
    assert receipt.peer_reference == "F2"
    assert peer.connections == 2
    assert await peer.wait_for(2) == [hl7("F1"), hl7("F2")]


async def test_a_peer_slower_than_the_ack_timeout(
    peer: MllpPeer, make_channel: MakeChannel
) -> None:
    channel = make_channel(peer.port, ack_timeout_seconds=0.2)
    peer.script(Reply(delay=3.0))
    started = time.monotonic()
    with pytest.raises(RetryableError, match=r"no ACK within 0\.2s"):
        await channel.send(env("S1"))
    assert time.monotonic() - started < 2.0
    # The late ACK for S1 can never be taken for S2's: S2 goes on a new connection.
    receipt = await channel.send(env("S2"))
    assert receipt.peer_reference == "S2"
    assert peer.connections == 2


async def test_an_ack_without_msa_segment_is_not_a_success() -> None:
    with pytest.raises(RetryableError, match="no MSA"):
        read_ack(b"MSH|^~\\&|A|B|C|D|20260101||ACK|1|P|2.5.1\r", "1")


@pytest.mark.parametrize(
    ("ack", "reason"),
    [
        # v2.3/2.4 put the code in ERR-1, component 4.
        (b"MSA|AE|X1\rERR|PID^1^3^103&Table value not found&HL70357", "ACK AE (ERR-1 103)"),
        # A "code" that is free text is not quoted.
        (b"MSA|AE|X1|see chart\rERR|||Patient TESTPATIENT unknown|E", "ACK AE"),
        (b"MSA|AE|X1\rERR|||207|E\rERR|||103|E\rERR|||207|E", "ACK AE (ERR-3 207, ERR-3 103)"),
        (b"MSA||X1", "ACK without a valid MSA-1"),
    ],
)
def test_ack_reasons_hold_codes_only(ack: bytes, reason: str) -> None:
    raw = b"MSH|^~\\&|A|B|C|D|20260101||ACK^I12|9|P|2.4\r" + ack
    with pytest.raises(RetryableError) as caught:
        read_ack(raw, "X1")
    assert caught.value.reason == reason


# -- connections ------------------------------------------------------------------------


async def test_one_message_in_flight_per_connection(
    peer: MllpPeer, make_channel: MakeChannel
) -> None:
    channel = make_channel(peer.port)
    peer.script(Reply(delay=0.2))  # time for a pipelining client to send the second early
    a, b = await asyncio.gather(channel.send(env("P1")), channel.send(env("P2")))
    assert (a.peer_reference, b.peer_reference) == ("P1", "P2")
    assert peer.log == [("recv", "P1"), ("ack", "P1"), ("recv", "P2"), ("ack", "P2")]
    assert peer.connections == 1


async def test_endpoint_overrides_the_target_with_one_connection_each(
    peer: MllpPeer, make_channel: MakeChannel
) -> None:
    channel = make_channel(peer.port)
    async with MllpPeer() as other:
        there = f"127.0.0.1:{other.port}"
        assert (await channel.send(env("E1", endpoint=there))).peer_reference == "E1"
        assert (await channel.send(env("E2"))).peer_reference == "E2"
        assert (await channel.send(env("E3", endpoint=there))).peer_reference == "E3"
        assert await other.wait_for(2) == [hl7("E1"), hl7("E3")]
        assert await peer.wait_for(1) == [hl7("E2")]
        assert (peer.connections, other.connections) == (1, 1)
        await channel.aclose()


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("10.1.2.3:2575", ("10.1.2.3", 2575)),
        ("mllp.clinic.example:6661", ("mllp.clinic.example", 6661)),
        ("[::1]:2575", ("::1", 2575)),
        ("[2001:db8::7]:1", ("2001:db8::7", 1)),
    ],
)
def test_parse_endpoint(endpoint: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(endpoint) == expected


@pytest.mark.parametrize(
    "endpoint",
    ["host", "host:", ":2575", "host:0", "host:65536", "host:25x", "::1:2575", "[::1]2575",
     "[nothost]:2575", "a b:1", "mllp://host:1"],
)  # fmt: skip
async def test_a_bad_endpoint_is_permanent(
    dead_port: socket.socket, make_channel: MakeChannel, endpoint: str
) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        parse_endpoint(endpoint)
    channel = make_channel(dead_port.getsockname()[1])
    with pytest.raises(PermanentError, match="is not host:port"):
        await channel.send(env("B1", endpoint=endpoint))


async def test_reconnects_after_the_peer_restarts(
    peer: MllpPeer, make_channel: MakeChannel
) -> None:
    channel = make_channel(peer.port)
    assert (await channel.send(env("R1"))).peer_reference == "R1"
    await peer.stop()
    await peer.start()
    assert (await channel.send(env("R2"))).peer_reference == "R2"
    assert peer.connections == 2
    assert await peer.wait_for(2) == [hl7("R1"), hl7("R2")]


async def test_peer_down_backs_off_then_reconnects(
    dead_port: socket.socket, make_channel: MakeChannel
) -> None:
    port = dead_port.getsockname()[1]
    clock = FakeClock()
    channel = make_channel(port, clock=clock, reconnect_initial_seconds=5, reconnect_max_seconds=8)
    with pytest.raises(RetryableError, match=f"127.0.0.1:{port}: connection refused"):
        await channel.send(env("D1"))
    # Inside the window: no connect attempt, fail at once and say when to come back.
    with pytest.raises(RetryableError, match="not reconnecting yet") as caught:
        await channel.send(env("D1"))
    assert caught.value.retry_after == pytest.approx(5)
    clock.now += 5
    with pytest.raises(RetryableError, match="connection refused"):
        await channel.send(env("D1"))
    with pytest.raises(RetryableError, match="not reconnecting yet") as caught:
        await channel.send(env("D1"))
    assert caught.value.retry_after == pytest.approx(8)  # doubled, capped at the max
    clock.now += 8
    dead_port.close()
    async with MllpPeer(port=port) as peer:
        assert (await channel.send(env("D1"))).peer_reference == "D1"
        assert await peer.wait_for(1) == [hl7("D1")]
        await channel.aclose()


async def test_a_clock_gone_backwards_does_not_stretch_the_backoff(
    dead_port: socket.socket, make_channel: MakeChannel
) -> None:
    clock = FakeClock()
    channel = make_channel(dead_port.getsockname()[1], clock=clock, reconnect_initial_seconds=60)
    with pytest.raises(RetryableError, match="connection refused"):
        await channel.send(env("W1"))
    clock.now -= 3600
    with pytest.raises(RetryableError, match="connection refused"):  # tried again, not held
        await channel.send(env("W1"))


async def test_idle_connection_is_closed_and_reopened(
    peer: MllpPeer, make_channel: MakeChannel
) -> None:
    channel = make_channel(peer.port, idle_close_seconds=0.1)
    await channel.send(env("I1"))
    await peer.wait_until(lambda: peer.connections == 1 and peer.open_connections == 0)
    assert (await channel.send(env("I2"))).peer_reference == "I2"
    assert peer.connections == 2


async def test_aclose_closes_the_connections(peer: MllpPeer, make_channel: MakeChannel) -> None:
    channel = make_channel(peer.port)
    await channel.send(env("A1"))
    assert peer.open_connections == 1
    await channel.aclose()
    await peer.wait_until(lambda: peer.open_connections == 0)


# -- TLS --------------------------------------------------------------------------------


async def test_tls_with_server_verification(pki: Pki, make_channel: MakeChannel) -> None:
    tls = server_tls(str(pki.server_cert), str(pki.server_key))
    async with MllpPeer(tls=tls) as peer:
        # Relative paths start at the config's folder (the context's base_dir).
        channel = make_channel(
            peer.port, base_dir=pki.ca_cert.parent, tls={"ca_file": pki.ca_cert.name}
        )
        assert (await channel.send(env("T1"))).peer_reference == "T1"
        assert await peer.wait_for(1) == [hl7("T1")]
        await channel.aclose()


async def test_tls_server_not_trusted_is_retryable_and_says_tls(
    pki: Pki, make_channel: MakeChannel
) -> None:
    tls = server_tls(str(pki.server_cert), str(pki.server_key))
    async with MllpPeer(tls=tls) as peer:
        channel = make_channel(peer.port, tls={"ca_file": str(pki.rogue_ca_cert)})
        with pytest.raises(RetryableError) as caught:
            await channel.send(env("T2"))
        assert "TLS handshake failed" in caught.value.reason
        assert peer.messages == []


async def test_tls_server_name_must_match(pki: Pki, make_channel: MakeChannel) -> None:
    tls = server_tls(str(pki.server_cert), str(pki.server_key))
    async with MllpPeer(tls=tls) as peer:
        wrong = make_channel(
            peer.port, tls={"ca_file": str(pki.ca_cert), "server_hostname": "ehr.example"}
        )
        with pytest.raises(RetryableError, match="TLS handshake failed"):
            await wrong.send(env("T3"))
        named = make_channel(
            peer.port, tls={"ca_file": str(pki.ca_cert), "server_hostname": "localhost"}
        )
        assert (await named.send(env("T4"))).peer_reference == "T4"
        await named.aclose()


@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_mutual_tls(pki: Pki, make_channel: MakeChannel, max_version: ssl.TLSVersion) -> None:
    tls = server_tls(
        str(pki.server_cert), str(pki.server_key), client_ca=str(pki.ca_cert),
        max_version=max_version,
    )  # fmt: skip
    async with MllpPeer(tls=tls) as peer:
        anonymous = make_channel(peer.port, tls={"ca_file": str(pki.ca_cert)})
        with pytest.raises(RetryableError) as caught:
            await anonymous.send(env("M1"))
        if max_version is ssl.TLSVersion.TLSv1_2:
            # TLS 1.2 refuses inside the handshake; 1.3 after it (then it depends on
            # whether the alert or the close is read first, so only "retryable" holds).
            assert "TLS" in caught.value.reason
        assert peer.messages == []
        rogue = make_channel(
            peer.port,
            tls={
                "ca_file": str(pki.ca_cert),
                "cert_file": str(pki.rogue_client_cert),
                "key_file": str(pki.rogue_client_key),
            },
        )
        with pytest.raises(RetryableError):
            await rogue.send(env("M2"))
        assert peer.messages == []
        signed = make_channel(
            peer.port,
            tls={
                "ca_file": str(pki.ca_cert),
                "cert_file": str(pki.client_cert),
                "key_file": str(pki.client_key),
            },
        )
        assert (await signed.send(env("M3"))).peer_reference == "M3"
        assert await peer.wait_for(1) == [hl7("M3")]
        for channel in (anonymous, rogue, signed):
            await channel.aclose()


def test_unreadable_tls_files_fail_at_build(tmp_path: Path) -> None:
    with pytest.raises(ChannelConfigError) as caught:
        registry.build(
            "x",
            {"type": "mllp", "port": 2575, "tls": {"ca_file": "missing.pem"}},
            ChannelContext(base_dir=tmp_path),
        )
    assert caught.value.problems[0].startswith("tls.ca_file: cannot load")


# -- payloads and settings --------------------------------------------------------------


async def test_control_id_is_read_from_the_payload(
    peer: MllpPeer, make_channel: MakeChannel
) -> None:
    channel = make_channel(peer.port)
    bare = Envelope(
        idempotency_key="k", delivery_id=7, referral_id="r", kind="packet",
        payload=hl7("FROMMSH10"), content_type=HL7V2, attempt=1,
    )  # fmt: skip
    assert (await channel.send(bare)).peer_reference == "FROMMSH10"


@pytest.mark.parametrize(
    ("payload", "content_type", "reason"),
    [
        (b'{"resourceType": "Task"}', "application/fhir+json", r"HL7 v2 \(ER7\) only"),
        (b"PID|1||12345\r", HL7V2, "no MSH segment"),
        (hl7(""), HL7V2, "MSH-10"),
        (hl7("V1", "a\x1c\rb"), HL7V2, "framing bytes"),
    ],
)
async def test_unsendable_payloads_are_permanent(
    dead_port: socket.socket,
    make_channel: MakeChannel,
    payload: bytes,
    content_type: str,
    reason: str,
) -> None:
    channel = make_channel(dead_port.getsockname()[1])
    with pytest.raises(PermanentError, match=reason):
        await channel.send(envelope(payload, content_type))


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({}, "port"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": 1, "ack_timeout_seconds": 0}, "ack_timeout_seconds"),
        ({"port": 1, "tls": {"key_file": "k.pem"}}, "tls"),
        ({"port": 1, "tls": {"cafile": "ca.pem"}}, "tls.cafile"),
        ({"port": 1, "reconnect_initial_seconds": 10, "reconnect_max_seconds": 1}, "(table)"),
        ({"port": 1, "idle_close_seconds": -1}, "idle_close_seconds"),
    ],
)
def test_settings_problems_name_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate({"type": "mllp", **settings})
    assert any(p.startswith(f"{key}:") for p in caught.value.problems), caught.value.problems


# -- the peer itself (others build end-to-end tests on it) --------------------------------


async def test_idempotent_peer_records_a_repeated_control_id_once(
    make_channel: MakeChannel,
) -> None:
    async with MllpPeer(idempotent=True) as peer:
        channel = make_channel(peer.port)
        peer.script(Reply(code="AE"))
        with pytest.raises(RetryableError):
            await channel.send(env("ID1"))
        assert (await channel.send(env("ID1"))).detail == "ACK AA"  # deduplicated: AA
        assert (await channel.send(env("ID2"))).peer_reference == "ID2"
        assert await peer.wait_for(2) == [hl7("ID1"), hl7("ID2")]
        assert (len(peer.arrivals), peer.duplicates) == (3, 1)
        await channel.aclose()


def test_peer_in_a_thread_serves_sync_code() -> None:
    with MllpPeer.run_in_thread(default=Reply(code="CA")) as peer:
        with socket.create_connection(("127.0.0.1", peer.port), timeout=5) as s:
            s.sendall(encode(hl7("TH1")))
            decoder, frames = FrameDecoder(), list[bytes]()
            while not frames:
                data = s.recv(65536)
                assert data, "peer closed without an answer"
                frames = [e.payload for e in decoder.feed(data) if isinstance(e, Frame)]
        assert b"MSA|CA|TH1" in frames[0]
        assert peer.wait_for(1) == [hl7("TH1")]
        assert peer.connections == 1
    with pytest.raises(AssertionError, match="1 message"):
        peer.wait_for(2, timeout=0.01)
