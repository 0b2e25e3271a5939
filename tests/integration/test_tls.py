"""TLS and mutual TLS on the MLLP listener, over real sockets, on both databases.

Certificates are made at test time (tests/integration/certs.py): a CA, a server
certificate for 127.0.0.1/localhost, a client certificate from the CA and one from an
impostor CA with the same name.

How a refusal looks depends on the client's TLS version. Under TLS 1.2 the server checks
the client certificate inside the handshake, so the client's handshake fails. Under
TLS 1.3 the client finishes its side of the handshake before the server has checked the
client certificate, so the client connects, then finds the connection closed unanswered.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from engine.edges.cli import main as cli
from engine.edges.daemon import Daemon
from engine.metrics import MLLP_CONNECTIONS_REFUSED
from engine.protocol.mllp import encode
from engine.store.database import open_engine
from engine.store.schema import messages
from tests.conftest import running
from tests.helpers import REFLOOP, RawMllp, ingest_status, msg, segments, wait_for
from tests.integration.certs import Pki, make_pki

TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_listener(pki: Pki, name: str = "tls", *, mutual: bool = False) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "cert_file": str(pki.server_cert),
        "key_file": str(pki.server_key),
        "min_version": "TLSv1.2",
    }
    if mutual:
        tls["client_ca_file"] = str(pki.ca_cert)
    return {"name": name, "host": "127.0.0.1", "port": 0, "tls": tls}


def client_ctx(
    pki: Pki,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client that trusts the test CA (and checks the server's name: 127.0.0.1)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if max_version is not None:
        ctx.maximum_version = max_version
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def stored(url: str) -> list[Any]:
    eng = open_engine(url)
    try:
        with eng.connect() as conn:
            return list(conn.execute(select(messages).order_by(messages.c.id)))
    finally:
        eng.dispose()


def tls_refusals(daemon: Daemon, listener: str) -> float:
    value = daemon.metrics.registry.get_sample_value(
        f"{MLLP_CONNECTIONS_REFUSED}_total", {"listener": listener, "reason": "tls_handshake"}
    )
    return value or 0.0


async def send_tls(port: int, ctx: ssl.SSLContext, control_id: str) -> tuple[bytes, str]:
    """Send one message over TLS: (the ACK, the TLS version negotiated)."""
    peer = await RawMllp.connect(port, ssl=ctx)
    try:
        version = peer.writer.get_extra_info("ssl_object").version()
        return await peer.send(msg(control_id)), version
    finally:
        await peer.close()


async def refusal(port: int, ctx: ssl.SSLContext | None, control_id: str) -> str:
    """How the listener turned this client away: "handshake" (the client's handshake
    failed) or "closed" (connected, then closed without an answer). Fails on any ACK."""
    try:
        peer = await RawMllp.connect(port, ssl=ctx)
    except (ssl.SSLError, ConnectionError):
        return "handshake"
    try:
        await peer.send_raw(encode(msg(control_id)))
        ack = await peer.read_frame()
    except (ssl.SSLError, ConnectionError):
        return "closed"
    finally:
        await peer.close()
    pytest.fail(f"a refused client got an answer: {ack!r}")


async def refloop(*args: object) -> tuple[int, str, str]:
    """Run the real CLI in a subprocess, so the in-process daemon keeps serving."""
    proc = await asyncio.create_subprocess_exec(
        str(REFLOOP),
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- TLS -------------------------------------------------------------------------------


async def test_tls_client_gets_aa_and_message_is_stored(config_for, upgraded_url, pki):
    async with running(config_for(listeners=[tls_listener(pki)])) as daemon:
        port = daemon.listeners[0].port
        ack, version = await send_tls(port, client_ctx(pki), "TLS1")
        rows_at_ack = stored(upgraded_url)
        refusals = tls_refusals(daemon, "tls")
    assert version in ("TLSv1.2", "TLSv1.3")
    assert segments(ack)["MSA"][1:3] == ["AA", "TLS1"]
    assert [(r.control_id, r.listener, ingest_status(r.status)) for r in rows_at_ack] == [
        ("TLS1", "tls", "received")
    ]
    assert rows_at_ack[0].raw == msg("TLS1")
    assert refusals == 0


async def test_tls12_only_client_is_served(config_for, upgraded_url, pki):
    # min_version TLSv1.2 means a TLS 1.2 peer (many EHRs) still gets through.
    async with running(config_for(listeners=[tls_listener(pki)])) as daemon:
        port = daemon.listeners[0].port
        ack, version = await send_tls(port, client_ctx(pki, max_version=TLS12), "TLS12")
    assert version == "TLSv1.2"
    assert segments(ack)["MSA"][1:3] == ["AA", "TLS12"]
    assert [r.control_id for r in stored(upgraded_url)] == ["TLS12"]


async def test_plaintext_client_on_tls_port_gets_no_ack_and_nothing_is_stored(
    config_for, upgraded_url, pki
):
    async with running(config_for(listeners=[tls_listener(pki)])) as daemon:
        port = daemon.listeners[0].port
        assert await refusal(port, None, "PLAIN1") == "closed"
        await wait_for(lambda: tls_refusals(daemon, "tls") == 1)
        # The listener still serves TLS; the writer is ordered, so once the TLS
        # message is stored, anything from the plaintext peer would have been too.
        ack, _ = await send_tls(port, client_ctx(pki), "AFTER1")
        rows = stored(upgraded_url)
        refusals = tls_refusals(daemon, "tls")
    assert segments(ack)["MSA"][1:3] == ["AA", "AFTER1"]
    assert [r.control_id for r in rows] == ["AFTER1"]
    assert refusals == 1


# -- mutual TLS --------------------------------------------------------------------------


async def test_mtls_client_with_ca_signed_cert_is_accepted(config_for, upgraded_url, pki):
    config = config_for(listeners=[tls_listener(pki, "mtls", mutual=True)])
    async with running(config) as daemon:
        port = daemon.listeners[0].port
        for control_id, version in (("MTLS13", TLS13), ("MTLS12", TLS12)):
            ctx = client_ctx(pki, pki.client_cert, pki.client_key, max_version=version)
            ack, _ = await send_tls(port, ctx, control_id)
            assert segments(ack)["MSA"][1:3] == ["AA", control_id]
        refusals = tls_refusals(daemon, "mtls")
    assert [(r.control_id, r.listener) for r in stored(upgraded_url)] == [
        ("MTLS13", "mtls"),
        ("MTLS12", "mtls"),
    ]
    assert refusals == 0


@pytest.mark.parametrize("client", ["no_cert", "rogue_ca_cert"])
async def test_mtls_refuses_client_without_a_trusted_cert(config_for, upgraded_url, pki, client):
    cert, key = {
        "no_cert": (None, None),
        "rogue_ca_cert": (pki.rogue_client_cert, pki.rogue_client_key),
    }[client]
    config = config_for(listeners=[tls_listener(pki, "mtls", mutual=True)])
    async with running(config) as daemon:
        port = daemon.listeners[0].port
        how_13 = await refusal(port, client_ctx(pki, cert, key, max_version=TLS13), "BAD13")
        how_12 = await refusal(port, client_ctx(pki, cert, key, max_version=TLS12), "BAD12")
        await wait_for(lambda: tls_refusals(daemon, "mtls") == 2)
        rows_after_refusals = stored(upgraded_url)
        # Same listener, trusted certificate: served, so the refusals were about the cert.
        good = client_ctx(pki, pki.client_cert, pki.client_key)
        ack, _ = await send_tls(port, good, "GOOD1")
        refusals = tls_refusals(daemon, "mtls")
    assert (how_13, how_12) == ("closed", "handshake")
    assert rows_after_refusals == []
    assert segments(ack)["MSA"][1:3] == ["AA", "GOOD1"]
    assert [r.control_id for r in stored(upgraded_url)] == ["GOOD1"]
    assert refusals == 2


# -- refloop send ------------------------------------------------------------------------


async def test_refloop_send_with_client_cert_prints_ack(config_for, upgraded_url, pki, tmp_path):
    message = tmp_path / "cli1.hl7"
    message.write_bytes(msg("CLI1"))
    config = config_for(listeners=[tls_listener(pki, "mtls", mutual=True)])
    async with running(config) as daemon:
        port = daemon.listeners[0].port
        code, out, err = await refloop(
            "send", message, "--port", port,
            "--tls-ca", pki.ca_cert, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key,
        )  # fmt: skip
    assert (code, out, err) == (0, "cli1.hl7: CLI1 AA\n", "")
    assert [r.control_id for r in stored(upgraded_url)] == ["CLI1"]


async def test_refloop_send_without_client_cert_fails_cleanly(
    config_for, upgraded_url, pki, tmp_path
):
    message = tmp_path / "cli2.hl7"
    message.write_bytes(msg("CLI2"))
    config = config_for(listeners=[tls_listener(pki, "mtls", mutual=True)])
    async with running(config) as daemon:
        port = daemon.listeners[0].port
        code, out, err = await refloop("send", message, "--port", port, "--tls-ca", pki.ca_cert)
        await wait_for(lambda: tls_refusals(daemon, "mtls") == 1)
    assert code == 1
    assert out == ""
    assert err.startswith(f"Error: could not talk to 127.0.0.1:{port}: ")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert stored(upgraded_url) == []


# -- refloop send: unusable TLS files -------------------------------------------------
# No daemon needed: these fail before connecting (port 9 is never contacted).


@pytest.mark.parametrize("problem", ["cert_without_its_key", "ca_file_not_a_certificate"])
def test_refloop_send_reports_unusable_tls_files_without_traceback(pki, tmp_path, problem):
    message = tmp_path / "m.hl7"
    message.write_bytes(msg("CLI3"))
    tls_args = {
        "cert_without_its_key": ["--tls-ca", pki.ca_cert, "--tls-cert", pki.client_cert],
        "ca_file_not_a_certificate": ["--tls-ca", message],
    }[problem]
    result = CliRunner().invoke(cli, ["send", str(message), "--port", "9", *map(str, tls_args)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.output.startswith("Error: ")


async def test_peer_outside_allowed_cidrs_is_refused_before_any_tls_handshake(
    config_for, upgraded_url, pki
):
    listener = {**tls_listener(pki, mutual=True), "allowed_cidrs": ["10.0.0.0/8"]}
    async with running(config_for(listeners=[listener])) as d:
        port = d.listeners[0].port
        how = await refusal(port, client_ctx(pki, pki.client_cert, pki.client_key), "CIDR1")
        cidr = d.metrics.registry.get_sample_value(
            f"{MLLP_CONNECTIONS_REFUSED}_total", {"listener": "tls", "reason": "cidr"}
        )
        handshakes = tls_refusals(d, "tls")
    assert how in ("handshake", "closed")
    assert cidr == 1
    assert handshakes == 0  # refused on the plain socket: no TLS work for a stranger
    assert stored(upgraded_url) == []
