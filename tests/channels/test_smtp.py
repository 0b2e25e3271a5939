"""The smtp channel against a real SMTP server (aiosmtpd, tests/peers/smtp_peer.py).

The default peer requires STARTTLS and AUTH, with a certificate from a CA made at test
time (tests/integration/certs.py); the channel trusts that CA through ``ca_file``.
"""

from __future__ import annotations

import asyncio
import gc
import re
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from channels import registry
from channels.base import (
    FHIR_JSON,
    HL7V2,
    HTML,
    PDF,
    TEXT,
    Channel,
    ChannelConfigError,
    ChannelContext,
    ChannelError,
    PermanentError,
    RetryableError,
)
from channels.smtp import message_id
from tests.channels.contract import SECRET_MARKER, ChannelContract, Received, envelope
from tests.helpers import free_port
from tests.integration.certs import Pki, make_pki
from tests.peers.smtp_peer import SmtpPeer

FROM = "Refloop Referrals <referrals@clinic.example>"
TO = "intake@cardio.example"
KEY = "d3b07384-d9a0-4c2b-8f9e-000000000001"

PDF_BYTES = (
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\r\n1 0 obj << /Title (Referral) >> endobj\r\n"
    + bytes(range(256))
    + b"\n%%EOF\n"
)
HTML_BYTES = (
    "<!doctype html>\r\n<html><head><meta charset=utf-8><title>Referral</title></head>\n"
    "<body><p>Referral for Zoë Müller — cardiology</p>\r\n</body></html>\n"
).encode()
HL7_BYTES = b"MSH|^~\\&|REFLOOP|CLINIC|||20240101||REF^I12|RL1|P|2.5.1\rRF1||Referral\r"
FHIR_BYTES = b'{"resourceType": "Bundle", "type": "message", "id": "Referral"}'


@pytest.fixture(scope="module", autouse=True)
def _no_leaked_sockets() -> Iterator[None]:
    # An unclosed socket warns when collected, which may be long after the test that
    # leaked it; collect once at the end so a leak fails this module, not a later one.
    yield
    gc.collect()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    (tmp_path / "smtp.pass").write_text("s3cret\n")
    (tmp_path / "wrong.pass").write_text("guess\n")
    return tmp_path


def settings(pki: Pki, port: int, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "type": "smtp",
        "host": "127.0.0.1",
        "port": port,
        "ca_file": str(pki.ca_cert),
        "username": "engine",
        "password": {"file": "smtp.pass"},
        "from_address": FROM,
        "to_address": TO,
        "helo_name": "refloop.test",
        "timeout_seconds": 5,
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not None}


def build(raw: dict[str, Any], base_dir: Path, **context: Any) -> Channel:
    return registry.build("mail", raw, ChannelContext(base_dir=base_dir, **context))


@pytest.fixture
def peer(pki: Pki) -> Iterator[SmtpPeer]:
    with SmtpPeer(pki.server_cert, pki.server_key, auth={"engine": "s3cret"}) as p:
        yield p


@pytest.fixture
async def channel(pki: Pki, peer: SmtpPeer, base_dir: Path) -> AsyncIterator[Channel]:
    ch = build(settings(pki, peer.port), base_dir)
    yield ch
    await ch.aclose()


class TestSmtpContract(ChannelContract):
    type_name = "smtp"

    @pytest.fixture
    async def contract_channel(self, channel: Channel) -> Channel:
        return channel

    @pytest.fixture
    def contract_received(self, peer: SmtpPeer) -> Received:
        async def received(n: int) -> list[bytes]:
            return [r.attachments()[0] for r in await peer.wait_for_async(n)]

        return received

    @pytest.fixture
    async def contract_down_channel(self, pki: Pki, base_dir: Path) -> AsyncIterator[Channel]:
        ch = build(settings(pki, free_port()), base_dir)
        yield ch
        await ch.aclose()

    @pytest.fixture
    def contract_payload(self) -> tuple[bytes, str]:
        return PDF_BYTES, PDF


# -- transport security -----------------------------------------------------------------


async def test_starttls_is_required_and_used(channel: Channel, peer: SmtpPeer) -> None:
    await channel.send(envelope(PDF_BYTES, PDF))
    [got] = peer.wait_for(1)
    assert got.tls_used
    assert got.envelope.mail_from == "referrals@clinic.example"
    assert got.envelope.rcpt_tos == [TO]


async def test_implicit_tls(pki: Pki, base_dir: Path) -> None:
    with SmtpPeer(
        pki.server_cert, pki.server_key, implicit_tls=True, auth={"engine": "s3cret"}
    ) as peer:
        ch = build(settings(pki, peer.port, security="tls"), base_dir)
        await ch.send(envelope(PDF_BYTES, PDF))
        [got] = peer.wait_for(1)
    assert got.tls_used
    assert got.attachments() == [PDF_BYTES]


async def test_server_without_starttls_is_permanent(pki: Pki, base_dir: Path) -> None:
    with SmtpPeer(None, None, require_starttls=False) as peer:
        ch = build(settings(pki, peer.port, username=None, password=None), base_dir)
        with pytest.raises(PermanentError) as caught:
            await ch.send(envelope(PDF_BYTES, PDF))
        assert peer.messages == []
    assert caught.value.reason == "server does not offer STARTTLS"


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "implicit-tls"])
async def test_untrusted_server_certificate_is_retryable(
    pki: Pki, base_dir: Path, implicit_tls: bool
) -> None:
    with SmtpPeer(
        pki.server_cert, pki.server_key, implicit_tls=implicit_tls, auth={"engine": "s3cret"}
    ) as peer:
        raw = settings(
            pki,
            peer.port,
            ca_file=str(pki.rogue_ca_cert),  # same CA name, different key
            security="tls" if implicit_tls else "starttls",
        )
        with pytest.raises(RetryableError) as caught:
            await build(raw, base_dir).send(envelope(PDF_BYTES, PDF))
        assert peer.messages == []
    assert caught.value.reason.startswith("TLS certificate verification failed")


async def test_verify_false_accepts_an_untrusted_certificate(pki: Pki, base_dir: Path) -> None:
    with SmtpPeer(pki.server_cert, pki.server_key, auth={"engine": "s3cret"}) as peer:
        raw = settings(pki, peer.port, ca_file=str(pki.rogue_ca_cert), verify=False)
        await build(raw, base_dir).send(envelope(PDF_BYTES, PDF))
        [got] = peer.wait_for(1)
    assert got.tls_used


def test_security_none_is_refused_unless_allow_insecure(pki: Pki) -> None:
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate(settings(pki, 25, security="none"))
    [problem] = caught.value.problems
    assert problem.startswith("security:")
    assert "clear text" in problem
    assert "allow_insecure" in problem
    ok = registry.validate(settings(pki, 25, security="none", allow_insecure=True))
    assert ok.security == "none"


async def test_security_none_with_allow_insecure_sends_in_clear(pki: Pki, base_dir: Path) -> None:
    with SmtpPeer(None, None, require_starttls=False) as peer:
        raw = settings(
            pki, peer.port, security="none", allow_insecure=True, username=None, password=None
        )
        await build(raw, base_dir).send(envelope(HL7_BYTES, HL7V2))
        [got] = peer.wait_for(1)
    assert not got.tls_used
    assert got.attachments() == [HL7_BYTES]


# -- authentication ---------------------------------------------------------------------


async def test_wrong_password_is_permanent_and_tried_once(
    pki: Pki, peer: SmtpPeer, base_dir: Path
) -> None:
    ch = build(settings(pki, peer.port, password={"file": "wrong.pass"}), base_dir)
    with pytest.raises(PermanentError) as caught:
        await ch.send(envelope(PDF_BYTES, PDF))
    assert caught.value.reason == "SMTP AUTH refused (535)"
    assert peer.messages == []
    assert peer.auth_failures == 1  # one refused try per attempt: no lockout by mechanisms


async def test_missing_password_secret_is_permanent(
    pki: Pki, peer: SmtpPeer, base_dir: Path
) -> None:
    ch = build(settings(pki, peer.port, password={"env": "REFLOOP_TEST_UNSET_SMTP"}), base_dir)
    with pytest.raises(PermanentError) as caught:
        await ch.send(envelope(PDF_BYTES, PDF))
    assert "REFLOOP_TEST_UNSET_SMTP" in caught.value.reason
    assert peer.auth_failures == 0


# -- reply codes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "code", "error"),
    [
        ("DATA", 451, RetryableError),
        ("DATA", 452, RetryableError),
        ("DATA", 554, PermanentError),
        ("RCPT", 450, RetryableError),
        ("RCPT", 550, PermanentError),
        ("RCPT", 553, PermanentError),
        ("MAIL", 421, RetryableError),
    ],
)
async def test_reply_codes(
    channel: Channel, peer: SmtpPeer, command: Any, code: int, error: type[ChannelError]
) -> None:
    # The server's text echoes what it was sent; the reason must carry the code only.
    peer.fail_next(command, code, f"{code // 100}.1.1 <{SECRET_MARKER}@cardio.example> no")
    with pytest.raises(ChannelError) as caught:
        await channel.send(envelope(PDF_BYTES, PDF))
    assert type(caught.value) is error
    assert str(code) in caught.value.reason
    assert SECRET_MARKER not in caught.value.reason
    assert peer.messages == []


async def test_a_retry_after_451_is_delivered_with_the_same_message_id(
    channel: Channel, peer: SmtpPeer
) -> None:
    peer.fail_next("DATA", 451)
    with pytest.raises(RetryableError):
        await channel.send(envelope(PDF_BYTES, PDF, key=KEY, attempt=1))
    first = await channel.send(envelope(PDF_BYTES, PDF, key=KEY, attempt=2))
    again = await channel.send(envelope(PDF_BYTES, PDF, key=KEY, attempt=3))
    other = await channel.send(envelope(PDF_BYTES, PDF, key="another-delivery", attempt=1))
    got = peer.wait_for(3)
    ids = [r.message["Message-ID"] for r in got]
    assert ids[0] == ids[1] == first.peer_reference == again.peer_reference
    assert ids[0] == f"<{KEY}@clinic.example>"
    assert ids[2] == other.peer_reference == "<another-delivery@clinic.example>"
    assert got[0].message["X-Refloop-Delivery"] == KEY


async def test_receipt_is_unconfirmed_and_quotes_no_server_text(
    channel: Channel, peer: SmtpPeer
) -> None:
    receipt = await channel.send(envelope(PDF_BYTES, PDF, key=KEY))
    assert receipt.confirmed is False  # a relay queued it; nobody has read it yet
    assert receipt.peer_reference == f"<{KEY}@clinic.example>"
    assert receipt.detail.startswith("250")
    assert "OK queued" not in receipt.detail  # the peer's own words


async def test_peer_down_says_connect(pki: Pki, base_dir: Path) -> None:
    port = free_port()
    with pytest.raises(RetryableError) as caught:
        await build(settings(pki, port), base_dir).send(envelope(PDF_BYTES, PDF))
    assert (
        caught.value.reason == f"SMTP connect to 127.0.0.1:{port} failed (ConnectionRefusedError)"
    )


async def test_a_silent_server_is_a_retryable_timeout(pki: Pki, base_dir: Path) -> None:
    # Listening but never greeting: the kernel completes the handshake, nobody answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        raw = settings(pki, listener.getsockname()[1], timeout_seconds=0.3)
        with pytest.raises(RetryableError) as caught:
            await build(raw, base_dir).send(envelope(PDF_BYTES, PDF))
    assert caught.value.reason == "SMTP timeout (connect)"


@pytest.mark.parametrize(
    ("greeting", "error", "reason"),
    [
        (b"", RetryableError, "SMTP server disconnected (connect)"),
        (b"421 4.3.2 busy, try later\r\n", RetryableError, "SMTP greeting deferred (421)"),
        (b"554 5.7.1 no service for you\r\n", PermanentError, "SMTP greeting refused (554)"),
    ],
    ids=["hang-up", "421", "554"],
)
async def test_what_a_server_says_first(
    pki: Pki, base_dir: Path, greeting: bytes, error: type[ChannelError], reason: str
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        ch = build(settings(pki, listener.getsockname()[1]), base_dir)
        sending = asyncio.create_task(ch.send(envelope(PDF_BYTES, PDF)))
        async with asyncio.timeout(5):
            conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        with conn:
            conn.sendall(greeting)
        with pytest.raises(ChannelError) as caught:
            await sending
    assert type(caught.value) is error
    assert caught.value.reason == reason


def test_message_id_is_deterministic_and_well_formed() -> None:
    odd = "route:cardiology/evt@1 two"  # characters a msg-id cannot carry bare
    first = message_id(odd, FROM)
    assert first == message_id(odd, FROM)
    assert re.fullmatch(r"<k[0-9a-f]{40}@clinic\.example>", first)
    assert message_id(odd + "x", FROM) != first


async def test_ca_file_is_relative_to_the_config_folder(
    pki: Pki, peer: SmtpPeer, base_dir: Path
) -> None:
    (base_dir / "tls").mkdir()
    (base_dir / "tls" / "relay-ca.pem").write_bytes(pki.ca_cert.read_bytes())
    ch = build(settings(pki, peer.port, ca_file="tls/relay-ca.pem"), base_dir)
    await ch.send(envelope(PDF_BYTES, PDF))
    assert peer.wait_for(1)[0].tls_used


async def test_an_unreadable_ca_file_is_permanent(pki: Pki, peer: SmtpPeer, base_dir: Path) -> None:
    ch = build(settings(pki, peer.port, ca_file="tls/missing.pem"), base_dir)
    with pytest.raises(PermanentError) as caught:
        await ch.send(envelope(PDF_BYTES, PDF))
    assert caught.value.reason.startswith("ca_file: cannot load")
    assert "missing.pem" in caught.value.reason


# -- the message ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "content_type", "filename"),
    [
        (PDF_BYTES, PDF, "referral.pdf"),
        (HTML_BYTES, HTML, "referral.html"),
        (FHIR_BYTES, FHIR_JSON, "referral.json"),
        (HL7_BYTES, HL7V2, "referral.hl7"),
    ],
    ids=["pdf", "html", "fhir-json", "hl7"],
)
async def test_the_attachment_arrives_unchanged(
    channel: Channel, peer: SmtpPeer, payload: bytes, content_type: str, filename: str
) -> None:
    await channel.send(envelope(payload, content_type))
    [got] = peer.wait_for(1)
    msg = got.message
    assert msg.get_content_type() == "multipart/mixed"
    [part] = list(msg.iter_attachments())
    assert part.get_content_type() == content_type
    assert part.get_filename() == filename
    assert got.attachments() == [payload]


async def test_the_renderer_may_name_the_file(channel: Channel, peer: SmtpPeer) -> None:
    meta = {"subject": "Referral", "filename": "../../etc/packet-RL1.pdf"}
    await channel.send(envelope(PDF_BYTES, PDF, metadata=meta))
    [got] = peer.wait_for(1)
    [part] = list(got.message.iter_attachments())
    assert part.get_filename() == "packet-RL1.pdf"  # a bare name, never a path


async def test_subject_and_body_carry_no_payload_content(
    pki: Pki, peer: SmtpPeer, base_dir: Path
) -> None:
    ch = build(settings(pki, peer.port), base_dir)
    marked = HTML_BYTES.replace(b"Referral", SECRET_MARKER.encode())
    # No subject from the renderer: the configured template is used.
    await ch.send(envelope(marked, HTML, metadata={"control_id": "RL1"}))
    await ch.send(envelope(marked, HTML, metadata={"subject": "Referral update"}))
    first, second = peer.wait_for(2)
    assert first.message["Subject"] == "Referral 0b7f8e36-0000-4000-8000-000000000001"
    assert second.message["Subject"] == "Referral update"
    for got in (first, second):
        body = got.message.get_body(preferencelist=("plain",))
        assert body is not None
        text = body.get_content()
        assert "referral packet is attached" in text
        headers = "\n".join(f"{k}: {v}" for k, v in got.message.items())
        assert SECRET_MARKER not in text
        assert SECRET_MARKER not in headers
        assert got.attachments() == [marked]


async def test_endpoint_overrides_to_address(channel: Channel, peer: SmtpPeer) -> None:
    await channel.send(envelope(PDF_BYTES, PDF, endpoint="Dr Who <tardis@cardio.example>"))
    [got] = peer.wait_for(1)
    assert got.envelope.rcpt_tos == ["tardis@cardio.example"]
    assert got.message["To"] == "Dr Who <tardis@cardio.example>"


@pytest.mark.parametrize(
    "endpoint", ["not an address", "a@b.example, c@d.example", "x@y.example\r\nBcc: z@z"]
)
async def test_an_endpoint_that_is_not_an_address_is_permanent(
    channel: Channel, peer: SmtpPeer, endpoint: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        await channel.send(envelope(PDF_BYTES, PDF, endpoint=endpoint))
    assert caught.value.reason.startswith("endpoint is ")
    assert endpoint not in caught.value.reason
    assert peer.messages == []


async def test_date_comes_from_the_context_clock(pki: Pki, peer: SmtpPeer, base_dir: Path) -> None:
    when = datetime(2024, 3, 5, 14, 30, 0, tzinfo=UTC)
    ch = build(settings(pki, peer.port), base_dir, clock=when.timestamp)
    await ch.send(envelope(PDF_BYTES, PDF))
    [got] = peer.wait_for(1)
    assert parsedate_to_datetime(got.message["Date"]) == when


# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        ({"password": None}, "(table)", "password: required"),
        ({"username": None}, "(table)", "username: required"),
        ({"from_address": "clinic"}, "from_address", "not an e-mail address"),
        ({"to_address": "a@b.example, c@d.example"}, "to_address", "exactly one"),
        ({"subject": "Referral for {patient_name}"}, "subject", "unknown placeholder"),
        ({"security": "ssl"}, "security", ""),
        ({"host": "smtp://mail.example:25"}, "host", "without scheme"),
    ],
)
def test_settings_refuse(pki: Pki, overrides: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate(settings(pki, 587, **overrides))
    assert any(p.startswith(f"{key}:") and words in p for p in caught.value.problems), (
        caught.value.problems
    )


@pytest.mark.parametrize(("security", "port"), [("starttls", 587), ("tls", 465)])
def test_port_defaults_by_security(pki: Pki, security: str, port: int) -> None:
    raw = settings(pki, 0, security=security)
    del raw["port"]
    assert registry.validate(raw).port == port


async def test_a_message_for_a_person_is_the_body_not_an_attachment(
    channel: Channel, peer: SmtpPeer
) -> None:
    # Patient outreach: the rendered text is the e-mail, with the template's subject.
    text = b"Hola: llame para su cita. Responda ALTO para no recibir mensajes."
    await channel.send(envelope(text, TEXT, metadata={"subject": "Su referido", "inline": "true"}))
    [got] = peer.wait_for(1)
    assert got.message["Subject"] == "Su referido"
    assert not got.message.is_multipart()
    assert got.message.get_content().strip() == text.decode()
