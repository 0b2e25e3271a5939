"""The fax channel against a real HTTP server playing a fax-gateway API
(:mod:`tests.channels.http_peer`: Werkzeug on a real loopback socket): the multipart
upload, the status polling to a receipt, and the pure status helpers a callback endpoint
will use."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from fpdf import FPDF
from werkzeug import Response

from channels import registry
from channels.base import (
    JSON,
    PDF,
    TEXT,
    ChannelConfigError,
    ChannelContext,
    PermanentError,
    Receipt,
    RetryableError,
)
from channels.fax import FaxChannel, FaxSettings, filename, outcome, parse_status_callback
from tests.channels.contract import SECRET_MARKER, ChannelContract, Received, envelope
from tests.channels.http_peer import (
    Answer,
    Part,
    Peer,
    built_channels,
    http_server_fixture,  # noqa: F401 (a fixture)
    peer_fixture,  # noqa: F401 (a fixture)
    stalled,
)
from tests.helpers import free_port

NOW = 1_760_000_000.0
TO = "+15550100123"
SUBMIT = "/v1/faxes"
FAX_ID = "fx-20251009-0001"
STATUS = f"/v1/faxes/{FAX_ID}"
API_TOKEN = "fax-api-token-test"


def referral_pdf(text: str = "Referral to cardiology") -> bytes:
    # Uncompressed, so the contract suite finds (and varies) the word in the bytes.
    pdf = FPDF()
    pdf.set_compression(False)
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(text=text)
    return bytes(pdf.output())


PDF_PAYLOAD = referral_pdf()


@pytest.fixture
def peer_path() -> str:
    return SUBMIT


def answer_polls(peer: Peer, *bodies: dict[str, Any] | Answer) -> None:
    """Script the status URL's answers: a dict is a 200 status body."""
    answers = [gateway(200, **b) if isinstance(b, dict) else b for b in bodies]
    peer.answer(*answers, path=STATUS, method="GET")


Build = Callable[..., FaxChannel]


@pytest.fixture
async def build(tmp_path: Path) -> AsyncIterator[Build]:
    (tmp_path / "fax.token").write_text(API_TOKEN + "\n")
    table = {"type": "fax", "token": {"file": "fax.token"}, "poll_seconds": 0.01}
    context = ChannelContext(base_dir=tmp_path, clock=lambda: NOW)
    async with built_channels(FaxChannel, "fax", table, context) as make:
        yield make


@pytest.fixture
def polling(peer: Peer, build: Build) -> Build:
    """``build`` for a channel that polls the peer's status URL."""

    def make(**raw: Any) -> FaxChannel:
        return build(url=peer.url(), status_url=peer.url("/v1/faxes/{id}"), **raw)

    return make


def gateway(http_status: int = 202, **body: Any) -> Response:
    if not body and http_status < 300:
        body = {"id": FAX_ID, "status": "queued"}
    return Response(json.dumps(body), status=http_status, content_type=JSON)


def fax(payload: bytes = PDF_PAYLOAD, content_type: str = PDF, **kw: Any) -> Any:
    kw.setdefault("endpoint", TO)
    return envelope(payload, content_type, **kw)


class TestFaxContract(ChannelContract):
    type_name = "fax"

    @pytest.fixture
    def contract_channel(self, peer: Peer, build: Build) -> FaxChannel:
        peer.answer(gateway())
        return build(url=peer.url(), to_number=TO)

    @pytest.fixture
    def contract_received(self, peer: Peer) -> Received:
        return peer.received(lambda seen: seen.files["file"].data)

    @pytest.fixture
    def contract_down_channel(self, build: Build) -> FaxChannel:
        return build(url=f"http://127.0.0.1:{free_port()}{SUBMIT}", to_number=TO)

    @pytest.fixture
    def contract_payload(self) -> tuple[bytes, str]:
        return PDF_PAYLOAD, PDF


# --- the upload ----------------------------------------------------------------------


async def test_the_multipart_carries_the_pdf_unchanged_and_the_fields(
    peer: Peer, build: Build
) -> None:
    peer.answer(gateway())
    channel = build(url=peer.url(), from_number="+15550100000", cover="referral-cover")
    meta = {"filename": "REF-1001.pdf", "subject": "Referral"}
    receipt = await channel.send(fax(key="k-fax-1", metadata=meta))
    [seen] = peer.seen
    assert seen.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert seen.files["file"] == Part("REF-1001.pdf", PDF, PDF_PAYLOAD)
    assert seen.form == {"to": TO, "from": "+15550100000", "cover": "referral-cover"}
    assert seen.headers["Idempotency-Key"] == "k-fax-1"
    assert seen.headers["Authorization"] == f"Bearer {API_TOKEN}"
    # No status_url: the gateway has it queued, nothing will confirm it here.
    assert receipt == Receipt(
        peer_reference=FAX_ID, detail="fax queued at the gateway", confirmed=False
    )


async def test_the_default_filename_and_no_optional_fields(peer: Peer, build: Build) -> None:
    peer.answer(gateway())
    await build(url=peer.url()).send(fax(metadata={"subject": "Referral"}))
    [seen] = peer.seen
    assert seen.files["file"].filename == "referral.pdf"
    assert seen.form == {"to": TO}


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("../../etc/passwd", "passwd"),
        ('C:\\scans\\Referral "final".pdf', "Referral _final_.pdf"),
        ("..", "referral.pdf"),
        ("", "referral.pdf"),
    ],
)
def test_filenames_lose_folders_and_quotes(given: str, sent: str) -> None:
    assert filename({"filename": given}) == sent


@pytest.mark.parametrize(
    ("endpoint", "sent"),
    [("+1 (555) 010-0123", "+15550100123"), ("0044 20 7946 0958", "00442079460958")],
)
async def test_separators_in_a_fax_number_are_dropped(
    peer: Peer, build: Build, endpoint: str, sent: str
) -> None:
    peer.answer(gateway())
    await build(url=peer.url()).send(fax(endpoint=endpoint))
    assert peer.seen[0].form["to"] == sent


@pytest.mark.parametrize("endpoint", ["fax me", "+1-555-CARDIO", "12", "cardiology@example.org"])
async def test_a_bad_fax_number_is_permanent_and_not_quoted(
    peer: Peer, build: Build, endpoint: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        await build(url=peer.url()).send(fax(endpoint=endpoint))
    assert caught.value.reason == "fax endpoint is not a fax number (digits, optional +)"
    assert peer.seen == []


@pytest.mark.parametrize("content_type", [TEXT, JSON, "text/html"])
async def test_anything_but_a_pdf_is_permanent(peer: Peer, build: Build, content_type: str) -> None:
    with pytest.raises(PermanentError, match="fax needs application/pdf"):
        await build(url=peer.url()).send(fax(b"Referral", content_type))
    assert peer.seen == []


async def test_no_number_at_all_is_permanent(peer: Peer, build: Build) -> None:
    with pytest.raises(PermanentError, match="no endpoint, no to_number"):
        await build(url=peer.url()).send(fax(endpoint=""))


# --- polling to a receipt ------------------------------------------------------------


async def test_polling_until_delivered_gives_a_confirmed_receipt(
    peer: Peer, polling: Build
) -> None:
    peer.answer(gateway())
    answer_polls(
        peer, {"status": "sending"}, {"status": "sending"}, {"id": FAX_ID, "status": "delivered"}
    )
    channel = polling()
    receipt = await channel.send(fax())
    assert receipt == Receipt(peer_reference=FAX_ID, detail="fax delivered", confirmed=True)
    polls = peer.of("GET")
    assert [p.path for p in polls] == [STATUS] * 3
    assert all(p.headers["Authorization"] == f"Bearer {API_TOKEN}" for p in polls)


@pytest.mark.parametrize("status", ["success", "COMPLETED", "Delivered"])
async def test_every_delivered_status_in_any_case_confirms(
    peer: Peer, polling: Build, status: str
) -> None:
    peer.answer(gateway())
    answer_polls(peer, {"status": status})
    receipt = await polling().send(fax())
    assert receipt.confirmed
    assert receipt.peer_reference == FAX_ID


async def test_a_failed_fax_is_retryable_and_names_the_code(peer: Peer, polling: Build) -> None:
    peer.answer(gateway())
    answer_polls(peer, {"status": "sending"}, {"status": "failed", "error_code": "busy"})
    channel = polling(
        permanent_failure_codes=["invalid_number"],
    )
    with pytest.raises(RetryableError) as caught:
        await channel.send(fax())
    assert caught.value.reason == "fax failed at the gateway, code busy"


async def test_a_permanent_failure_code_is_permanent(peer: Peer, polling: Build) -> None:
    peer.answer(gateway())
    answer_polls(peer, {"status": "error", "error_code": "INVALID_NUMBER", "detail": SECRET_MARKER})
    channel = polling(
        permanent_failure_codes=["invalid_number", "not_a_fax_line"],
    )
    with pytest.raises(PermanentError) as caught:
        await channel.send(fax())
    assert caught.value.reason == "fax error at the gateway, code INVALID_NUMBER"
    assert SECRET_MARKER not in str(caught.value)


async def test_the_failure_code_field_is_configurable(peer: Peer, polling: Build) -> None:
    peer.answer(gateway())
    answer_polls(peer, {"status": "failed", "reason_code": "1402"})
    channel = polling(
        failure_code_field="reason_code",
        permanent_failure_codes=["1402"],
    )
    with pytest.raises(PermanentError, match="code 1402"):
        await channel.send(fax())


async def test_still_pending_after_the_receipt_timeout_is_an_unconfirmed_receipt(
    peer: Peer, polling: Build
) -> None:
    peer.answer(gateway())
    answer_polls(peer, {"status": "sending"})
    channel = polling(
        poll_seconds=0.05,
        receipt_timeout_seconds=0.3,
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    receipt = await channel.send(fax())
    assert receipt == Receipt(
        peer_reference=FAX_ID, detail="fax queued at the gateway", confirmed=False
    )
    assert 0.3 <= loop.time() - started < 2
    assert len(peer.of("GET")) >= 2
    assert len(peer.of("POST")) == 1  # never resent


async def test_a_stalled_poll_never_overruns_the_attempt(peer: Peer, polling: Build) -> None:
    # The dispatcher cancels an attempt past timeout_seconds and would resend the fax: the
    # channel must answer within it, with the unconfirmed receipt, even if a poll hangs.
    channel = polling(timeout_seconds=0.6, receipt_timeout_seconds=0.6)
    loop = asyncio.get_running_loop()
    with stalled(gateway(200, status="delivered")) as stall:
        peer.answer(gateway())
        answer_polls(peer, stall)
        started = loop.time()
        receipt = await channel.send(fax())
        elapsed = loop.time() - started
    assert receipt == Receipt(
        peer_reference=FAX_ID, detail="fax queued at the gateway", confirmed=False
    )
    assert elapsed < 0.6 + 0.3


async def test_a_status_in_the_submit_answer_needs_no_poll(peer: Peer, polling: Build) -> None:
    peer.answer(gateway(200, id=FAX_ID, status="failed", error_code="invalid_number"))
    answer_polls(peer, {"status": "delivered"})
    channel = polling(
        permanent_failure_codes=["invalid_number"],
    )
    with pytest.raises(PermanentError, match="code invalid_number"):
        await channel.send(fax())
    assert peer.of("GET") == []


async def test_a_poll_that_fails_for_now_is_asked_again(peer: Peer, polling: Build) -> None:
    peer.answer(gateway())
    answer_polls(peer, Response("", status=503), gateway(200, status="delivered"))
    receipt = await polling().send(fax())
    assert receipt.confirmed
    assert len(peer.of("GET")) == 2


async def test_a_poll_that_cannot_succeed_ends_with_an_unconfirmed_receipt(
    peer: Peer, polling: Build
) -> None:
    # The fax is at the gateway either way; a wrong status_url must not dead-letter it.
    peer.answer(gateway())
    answer_polls(peer, Response("", status=404))
    receipt = await polling().send(fax())
    assert receipt == Receipt(
        peer_reference=FAX_ID,
        detail="fax queued at the gateway; status poll HTTP 404",
        confirmed=False,
    )
    assert len(peer.of("GET")) == 1


async def test_a_status_body_that_is_not_json_keeps_polling(peer: Peer, polling: Build) -> None:
    peer.answer(gateway())
    answer_polls(
        peer, Response("<html>busy</html>", content_type="text/html"), {"status": "delivered"}
    )
    receipt = await polling().send(fax())
    assert receipt.confirmed


# --- submit faults -------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        Response("accepted", status=200, content_type="text/plain"),
        Response(json.dumps({"status": "queued"}), status=202, content_type=JSON),
        Response(json.dumps({"id": "two words"}), status=202, content_type=JSON),
        Response("", status=204),
    ],
    ids=["not-json", "no-id", "id-not-a-token", "empty"],
)
async def test_a_2xx_without_a_fax_id_is_retryable(
    peer: Peer, build: Build, answer: Response
) -> None:
    # Without an id the fax cannot be tracked, and a gateway that queued one says which.
    # Retrying is safer than a receipt for a fax that may never leave: the Idempotency-Key
    # lets a gateway that did queue it answer with that fax instead of sending it again.
    peer.answer(answer)
    with pytest.raises(RetryableError, match="without a fax id"):
        await build(url=peer.url()).send(fax())


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retryable(peer: Peer, build: Build, status: int) -> None:
    peer.answer(Response("down", status=status))
    with pytest.raises(RetryableError) as caught:
        await build(url=peer.url()).send(fax())
    assert caught.value.reason == f"HTTP {status}"


@pytest.mark.parametrize(
    "retry_after", ["45", formatdate(NOW + 45, usegmt=True)], ids=["seconds", "date"]
)
async def test_429_with_retry_after(peer: Peer, build: Build, retry_after: str) -> None:
    peer.answer(Response("", status=429, headers={"Retry-After": retry_after}))
    with pytest.raises(RetryableError) as caught:
        await build(url=peer.url()).send(fax())
    assert caught.value.retry_after == 45.0


@pytest.mark.parametrize("status", [400, 401, 413, 422])
async def test_client_errors_are_permanent_and_never_quote_the_body(
    peer: Peer, build: Build, status: int
) -> None:
    body = {"code": "invalid_request", "message": f"cannot fax {TO} for {SECRET_MARKER}"}
    peer.answer(gateway(status, **body))
    with pytest.raises(PermanentError) as caught:
        await build(url=peer.url()).send(fax())
    assert caught.value.reason == f"HTTP {status}, code invalid_request"
    assert SECRET_MARKER not in str(caught.value)
    assert TO not in str(caught.value)


async def test_a_gateway_slower_than_the_timeout_is_retryable(peer: Peer, build: Build) -> None:
    channel = build(url=peer.url(), timeout_seconds=0.3)
    loop = asyncio.get_running_loop()
    with stalled(gateway()) as stall:
        peer.answer(stall)
        started = loop.time()
        with pytest.raises(RetryableError, match="timeout"):
            await channel.send(fax())
        assert loop.time() - started < 3


# --- the pure status helpers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"id": "fx-1", "status": "delivered"}, ("fx-1", "delivered")),
        ({"id": 42, "status": "FAILED", "error_code": "busy"}, ("42", "failed")),
        ({"id": "fx-1", "status": "in_progress"}, ("fx-1", "in_progress")),
    ],
)
def test_parse_status_callback(body: dict[str, Any], expected: tuple[str, str]) -> None:
    assert parse_status_callback(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        {"status": "delivered"},
        {"id": "fx-1"},
        {"id": "", "status": "delivered"},
        {"id": "fx-1", "status": "delivered to Dr Smith"},
        {"id": ["fx-1"], "status": "delivered"},
        {"id": True, "status": "delivered"},
    ],
)
def test_parse_status_callback_refuses_bodies_without_an_id_and_a_status(
    body: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match="status body has no"):
        parse_status_callback(body)


def _settings(**raw: Any) -> FaxSettings:
    settings = registry.validate({"type": "fax", "url": "https://gw.example/v1/faxes", **raw})
    assert isinstance(settings, FaxSettings)
    return settings


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        ("delivered", "", Receipt(peer_reference="fx-1", detail="fax delivered")),
        ("queued", "", None),
        ("sending", "", None),
        ("failed", "", RetryableError("fax failed at the gateway")),
        ("failed", "busy", RetryableError("fax failed at the gateway, code busy")),
        (
            "failed",
            "Invalid_Number",
            PermanentError("fax failed at the gateway, code Invalid_Number"),
        ),
    ],
)
def test_outcome(status: str, code: str, expected: Any) -> None:
    got = outcome(_settings(permanent_failure_codes=["invalid_number"]), "fx-1", status, code)
    if isinstance(expected, Exception):
        assert type(got) is type(expected)
        assert str(got) == str(expected)
    else:
        assert got == expected


def test_configured_statuses_replace_the_defaults() -> None:
    settings = _settings(delivered_statuses=["SENT"], failed_statuses=["No-Answer"])
    assert outcome(settings, "fx-1", "sent") == Receipt(peer_reference="fx-1", detail="fax sent")
    assert outcome(settings, "fx-1", "delivered") is None
    assert isinstance(outcome(settings, "fx-1", "no-answer"), RetryableError)


# --- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("status_url", "https://gw.example/v1/faxes/status"),
        ("status_url", "http://gw.example/v1/faxes/{id}"),
        ("url", "http://gw.example/v1/faxes"),
        ("to_number", "reception"),
        ("poll_seconds", 0),
        ("receipt_timeout_seconds", -1),
        ("auth_header", "Bad Header"),
    ],
)
def test_settings_refuse_bad_values(key: str, value: Any) -> None:
    with pytest.raises(ChannelConfigError) as caught:
        _settings(**{key: value})
    assert any(p.startswith(f"{key}:") for p in caught.value.problems)


def test_the_receipt_timeout_fits_in_the_attempt() -> None:
    settings = _settings()
    assert settings.receipt_timeout_seconds <= settings.timeout_seconds
    _settings(timeout_seconds=300, receipt_timeout_seconds=300)
    with pytest.raises(ChannelConfigError) as caught:
        _settings(timeout_seconds=30, receipt_timeout_seconds=60)
    assert any(
        p.startswith("receipt_timeout_seconds:") and "timeout_seconds" in p
        for p in caught.value.problems
    )


def test_settings_need_a_url() -> None:
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate({"type": "fax"})
    assert any(p.startswith("url:") for p in caught.value.problems)
