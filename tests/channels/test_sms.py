"""The sms channel against a real HTTP server playing Twilio's Messages API
(:mod:`tests.channels.http_peer`: Werkzeug on a real loopback socket)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
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
from channels.sms import SEGMENT_CHARS, SmsChannel
from tests.channels.contract import SECRET_MARKER, ChannelContract, Received, envelope
from tests.channels.http_peer import (
    Peer,
    built_channels,
    http_server_fixture,  # noqa: F401 (a fixture)
    peer_fixture,  # noqa: F401 (a fixture)
    stalled,
)
from tests.helpers import free_port

NOW = 1_760_000_000.0
ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
AUTH_TOKEN = "twilio-auth-token-test"
FROM = "+15550100100"
TO = "+15550100199"
MESSAGES = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
TEXT_PAYLOAD = b"Referral to cardiology received. Call 555-0100 to book."


@pytest.fixture
def peer_path() -> str:
    return MESSAGES


Build = Callable[..., SmsChannel]


@pytest.fixture
async def build(tmp_path: Path) -> AsyncIterator[Build]:
    (tmp_path / "twilio.token").write_text(AUTH_TOKEN + "\n")
    table = {
        "type": "sms",
        "account_sid": ACCOUNT_SID,
        "auth_token": {"file": "twilio.token"},
        "from_number": FROM,
    }
    context = ChannelContext(base_dir=tmp_path, clock=lambda: NOW)
    async with built_channels(SmsChannel, "sms", table, context) as make:
        yield make


def twilio(http_status: int = 201, **body: Any) -> Response:
    """A Twilio-shaped answer: a Message resource, or an error with a numeric code."""
    if not body and http_status < 300:
        body = {"sid": "SM0123456789abcdef0123456789abcdef", "status": "queued"}
    return Response(json.dumps(body), status=http_status, content_type=JSON)


def sms(payload: bytes = TEXT_PAYLOAD, content_type: str = TEXT, **kw: Any) -> Any:
    kw.setdefault("endpoint", TO)
    return envelope(payload, content_type, **kw)


class TestSmsContract(ChannelContract):
    type_name = "sms"

    @pytest.fixture
    def contract_channel(self, peer: Peer, build: Build) -> SmsChannel:
        peer.answer(twilio())
        # The contract's envelopes name no endpoint: to_number is the default recipient.
        return build(base_url=peer.base_url(), to_number=TO)

    @pytest.fixture
    def contract_received(self, peer: Peer) -> Received:
        return peer.received(lambda seen: seen.form["Body"].encode())

    @pytest.fixture
    def contract_down_channel(self, build: Build) -> SmsChannel:
        return build(base_url=f"http://127.0.0.1:{free_port()}", to_number=TO)

    @pytest.fixture
    def contract_payload(self) -> tuple[bytes, str]:
        return TEXT_PAYLOAD, TEXT


# --- what Twilio gets ----------------------------------------------------------------


async def test_form_fields_and_basic_auth_are_what_twilio_expects(peer: Peer, build: Build) -> None:
    peer.answer(twilio())
    channel = build(base_url=peer.base_url(), status_callback="https://refloop.example/sms/status")
    receipt = await channel.send(sms(key="k-sms-1"))
    [seen] = peer.seen
    assert seen.path == MESSAGES
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert (seen.username, seen.password) == (ACCOUNT_SID, AUTH_TOKEN)
    assert seen.form == {
        "To": TO,
        "From": FROM,
        "Body": TEXT_PAYLOAD.decode(),
        "StatusCallback": "https://refloop.example/sms/status",
    }
    assert seen.headers["Idempotency-Key"] == "k-sms-1"
    # Queued at Twilio is not delivered to the phone: the StatusCallback confirms later.
    assert receipt == Receipt(
        peer_reference="SM0123456789abcdef0123456789abcdef",
        detail="HTTP 201 queued",
        confirmed=False,
    )


async def test_without_a_status_callback_none_is_sent(peer: Peer, build: Build) -> None:
    peer.answer(twilio())
    await build(base_url=peer.base_url()).send(sms())
    assert set(peer.seen[0].form) == {"To", "From", "Body"}


async def test_a_gateway_that_says_delivered_gives_a_confirmed_receipt(
    peer: Peer, build: Build
) -> None:
    peer.answer(twilio(200, sid="SM1", status="delivered"))
    receipt = await build(base_url=peer.base_url()).send(sms())
    assert receipt == Receipt(peer_reference="SM1", detail="HTTP 200 delivered", confirmed=True)


async def test_unicode_text_arrives_unchanged(peer: Peer, build: Build) -> None:
    text = "Référral: Dr. Müller, cardiología — 📅 lundi 9h"
    peer.answer(twilio())
    await build(base_url=peer.base_url()).send(sms(text.encode()))
    assert peer.seen[0].form["Body"] == text


@pytest.mark.parametrize(
    ("endpoint", "sent"),
    [("+1 (555) 010-0199", "+15550100199"), ("+44 20 7946 0958", "+442079460958")],
)
async def test_separators_in_a_number_are_dropped(
    peer: Peer, build: Build, endpoint: str, sent: str
) -> None:
    peer.answer(twilio())
    await build(base_url=peer.base_url()).send(sms(endpoint=endpoint))
    assert peer.seen[0].form["To"] == sent


async def test_the_endpoint_wins_over_to_number(peer: Peer, build: Build) -> None:
    peer.answer(twilio())
    await build(base_url=peer.base_url(), to_number="+15550100111").send(sms(endpoint=TO))
    assert peer.seen[0].form["To"] == TO


# --- refused before sending ----------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    ["5550100199", "+0555010", "+1555010019912345", "+1-555-CARDIO", "patient@example.org"],
)
async def test_a_bad_number_is_permanent_and_not_quoted(
    peer: Peer, build: Build, endpoint: str
) -> None:
    peer.answer(twilio())
    with pytest.raises(PermanentError) as caught:
        await build(base_url=peer.base_url()).send(sms(endpoint=endpoint))
    assert caught.value.reason == "sms endpoint is not an E.164 number"
    assert peer.seen == []


async def test_no_number_at_all_is_permanent(peer: Peer, build: Build) -> None:
    with pytest.raises(PermanentError, match="no endpoint, no to_number"):
        await build(base_url=peer.base_url()).send(sms(endpoint=""))


@pytest.mark.parametrize("content_type", [JSON, PDF, "text/html"])
async def test_anything_but_text_is_permanent(peer: Peer, build: Build, content_type: str) -> None:
    with pytest.raises(PermanentError, match="sms needs text/plain"):
        await build(base_url=peer.base_url()).send(sms(content_type=content_type))
    assert peer.seen == []


async def test_text_with_a_charset_parameter_is_text(peer: Peer, build: Build) -> None:
    peer.answer(twilio())
    await build(base_url=peer.base_url()).send(sms(content_type="text/plain; charset=utf-8"))
    assert len(peer.seen) == 1


async def test_a_body_that_is_not_utf8_is_permanent(peer: Peer, build: Build) -> None:
    with pytest.raises(PermanentError, match="not UTF-8"):
        await build(base_url=peer.base_url()).send(sms(b"Referral \xff\xfe"))


async def test_bodies_over_max_segments_are_refused(peer: Peer, build: Build) -> None:
    peer.answer(twilio())
    channel = build(base_url=peer.base_url(), max_segments=2)
    await channel.send(sms(b"R" * (2 * SEGMENT_CHARS)))
    with pytest.raises(PermanentError) as caught:
        await channel.send(sms(b"R" * (2 * SEGMENT_CHARS + 1)))
    assert caught.value.reason == "sms body too long: 3 segments, max_segments 2"
    assert len(peer.seen) == 1


async def test_the_default_limit_is_ten_segments(peer: Peer, build: Build) -> None:
    with pytest.raises(PermanentError, match="max_segments 10"):
        await build(base_url=peer.base_url()).send(sms(b"R" * (10 * SEGMENT_CHARS + 1)))


async def test_a_missing_auth_token_is_permanent_and_nothing_is_sent(
    peer: Peer, build: Build
) -> None:
    peer.answer(twilio())
    channel = build(base_url=peer.base_url(), auth_token={"env": "REFLOOP_TEST_UNSET_SMS_TOKEN"})
    with pytest.raises(PermanentError, match="secret not set"):
        await channel.send(sms())
    assert peer.seen == []


# --- Twilio's answers and faults -----------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(400, 21211), (400, 21610), (401, 20003)])
async def test_twilio_error_codes_are_surfaced_without_the_message(
    peer: Peer, build: Build, status: int, code: int
) -> None:
    peer.answer(
        twilio(
            status,
            code=code,
            message=f"The 'To' number {TO} ({SECRET_MARKER}) is not valid.",
            more_info=f"https://www.twilio.com/docs/errors/{code}",
            status=status,
        )
    )
    with pytest.raises(PermanentError) as caught:
        await build(base_url=peer.base_url()).send(sms())
    assert caught.value.reason == f"HTTP {status}, code {code}"
    assert SECRET_MARKER not in str(caught.value)
    assert TO not in str(caught.value)


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retryable(peer: Peer, build: Build, status: int) -> None:
    peer.answer(Response("upstream trouble", status=status))
    with pytest.raises(RetryableError) as caught:
        await build(base_url=peer.base_url()).send(sms())
    assert caught.value.reason == f"HTTP {status}"


async def test_429_with_retry_after_seconds(peer: Peer, build: Build) -> None:
    response = twilio(429, code=20429, message="Too Many Requests")
    response.headers["Retry-After"] = "30"
    peer.answer(response)
    with pytest.raises(RetryableError) as caught:
        await build(base_url=peer.base_url()).send(sms())
    assert caught.value.reason == "HTTP 429, code 20429"
    assert caught.value.retry_after == 30.0


async def test_429_with_retry_after_as_a_date(peer: Peer, build: Build) -> None:
    response = Response("", status=429, headers={"Retry-After": formatdate(NOW + 90, usegmt=True)})
    peer.answer(response)
    with pytest.raises(RetryableError) as caught:
        await build(base_url=peer.base_url()).send(sms())
    assert caught.value.retry_after == 90.0


async def test_a_gateway_slower_than_the_timeout_is_retryable(peer: Peer, build: Build) -> None:
    channel = build(base_url=peer.base_url(), timeout_seconds=0.3)
    loop = asyncio.get_running_loop()
    with stalled(twilio()) as stall:
        peer.answer(stall)
        started = loop.time()
        with pytest.raises(RetryableError, match="timeout"):
            await channel.send(sms())
        assert loop.time() - started < 3


async def test_a_2xx_that_is_not_json_is_an_unconfirmed_receipt(peer: Peer, build: Build) -> None:
    # The gateway took the message; Twilio ignores Idempotency-Key, so retrying would
    # text the patient twice. A receipt without a sid says so.
    peer.answer(Response("OK", status=200, content_type="text/plain"))
    receipt = await build(base_url=peer.base_url()).send(sms())
    assert receipt == Receipt(peer_reference="", detail="HTTP 200, no sid", confirmed=False)


# --- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("from_number", "5550100100"),
        ("to_number", "call me"),
        ("account_sid", "AC/../../x"),
        ("base_url", "http://twilio.example"),
        ("max_segments", 0),
    ],
)
def test_settings_refuse_bad_values(key: str, value: Any) -> None:
    table = {
        "type": "sms",
        "account_sid": ACCOUNT_SID,
        "auth_token": {"env": "X"},
        "from_number": FROM,
        key: value,
    }
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate(table)
    assert any(p.startswith(f"{key}:") for p in caught.value.problems)


def test_settings_default_to_twilio_over_https() -> None:
    settings = registry.validate(
        {"type": "sms", "account_sid": ACCOUNT_SID, "auth_token": {"env": "X"}, "from_number": FROM}
    )
    assert settings.base_url == "https://api.twilio.com"
    assert settings.max_segments == 10
