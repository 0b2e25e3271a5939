"""The webhook channel against a real HTTP server (:mod:`tests.channels.http_peer`:
Werkzeug on a real loopback socket); the HTTP plumbing it shares with the other HTTP
channels is tested on its own in ``test_http.py``."""

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
    ChannelConfigError,
    ChannelContext,
    PermanentError,
    Receipt,
    RetryableError,
)
from channels.webhook import WebhookChannel, verify_signature
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
SIGNING_SECRET = "whsec-test-0123456789"
PAYLOAD = b'{"resourceType":"Bundle","type":"message","note":"Referral to cardiology"}'


@pytest.fixture
def peer_path() -> str:
    return "/hook"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


Build = Callable[..., WebhookChannel]


@pytest.fixture
async def build(tmp_path: Path, clock: Clock) -> AsyncIterator[Build]:
    (tmp_path / "webhook.secret").write_text(SIGNING_SECRET + "\n")
    table = {"type": "webhook", "signing_secret": {"file": "webhook.secret"}}
    context = ChannelContext(base_dir=tmp_path, clock=clock)
    async with built_channels(WebhookChannel, "hook", table, context) as make:
        yield make


def ok(body: Any = None, status: int = 200, **headers: str) -> Response:
    data = json.dumps(body) if body is not None else ""
    return Response(data, status=status, headers=headers, content_type=JSON)


class TestWebhookContract(ChannelContract):
    type_name = "webhook"

    @pytest.fixture
    def contract_channel(self, peer: Peer, build: Build) -> WebhookChannel:
        peer.answer(ok({"id": "evt-1"}))
        return build(url=peer.url())

    @pytest.fixture
    def contract_received(self, peer: Peer) -> Received:
        return peer.received(lambda seen: seen.body)

    @pytest.fixture
    def contract_down_channel(self, build: Build) -> WebhookChannel:
        return build(url=f"http://127.0.0.1:{free_port()}/hook")

    @pytest.fixture
    def contract_payload(self) -> tuple[bytes, str]:
        return PAYLOAD, JSON


# --- what the receiver gets ----------------------------------------------------------


async def test_the_receiver_gets_the_body_unchanged_with_documented_headers(
    peer: Peer, build: Build
) -> None:
    peer.answer(ok({"id": "evt-9"}, status=201))
    channel = build(url=peer.url())
    receipt = await channel.send(envelope(PAYLOAD, JSON, delivery_id=42, attempt=3, key="k-42"))
    assert receipt == Receipt(peer_reference="evt-9", detail="HTTP 201")
    [seen] = peer.seen
    assert seen.body == PAYLOAD
    assert seen.headers["Content-Type"] == JSON
    assert seen.headers["Idempotency-Key"] == "k-42"
    assert seen.headers["X-Refloop-Delivery"] == "42"
    assert seen.headers["X-Refloop-Attempt"] == "3"
    assert seen.headers["X-Refloop-Timestamp"] == str(int(NOW))
    assert seen.headers["X-Refloop-Signature"].startswith("v1=")
    assert "Authorization" not in seen.headers  # no token configured, none sent


async def test_the_signature_verifies_and_a_tampered_body_does_not(
    peer: Peer, build: Build
) -> None:
    peer.answer(ok())
    await build(url=peer.url()).send(envelope(PAYLOAD, JSON))
    [seen] = peer.seen
    timestamp = seen.headers["X-Refloop-Timestamp"]
    header = seen.headers["X-Refloop-Signature"]
    assert verify_signature(SIGNING_SECRET, timestamp, seen.body, header, now=NOW + 10)
    tampered = seen.body.replace(b"cardiology", b"dermatology")
    assert not verify_signature(SIGNING_SECRET, timestamp, tampered, header, now=NOW)
    assert not verify_signature("another-secret", timestamp, seen.body, header, now=NOW)
    # The timestamp is signed too: moving it (a replay with a fresh time) breaks it.
    assert not verify_signature(SIGNING_SECRET, str(int(NOW) + 1), seen.body, header, now=NOW)
    # A stale (replayed) delivery is refused even with a good signature.
    assert not verify_signature(SIGNING_SECRET, timestamp, seen.body, header, now=NOW + 301)
    assert verify_signature(SIGNING_SECRET, timestamp, seen.body, header, now=NOW - 300)


def test_verify_signature_accepts_any_of_several_v1_values_for_key_rotation() -> None:
    from channels.webhook import signature_header

    good = signature_header(SIGNING_SECRET, 100, b"{}")
    old = signature_header("retired-secret", 100, b"{}")
    assert verify_signature(SIGNING_SECRET, "100", b"{}", f"{old}, {good}", now=100)
    assert not verify_signature(SIGNING_SECRET, "100", b"{}", old, now=100)
    assert not verify_signature(SIGNING_SECRET, "100", b"{}", good.replace("v1", "v0"), now=100)
    assert not verify_signature(SIGNING_SECRET, "1e2", b"{}", good, now=100)
    assert not verify_signature(SIGNING_SECRET, "100", b"{}", "", now=100)


async def test_attempts_of_one_delivery_carry_the_same_idempotency_key(
    peer: Peer, build: Build, clock: Clock
) -> None:
    peer.answer(ok(status=503), ok())
    channel = build(url=peer.url())
    with pytest.raises(RetryableError):
        await channel.send(envelope(PAYLOAD, JSON, attempt=1, key="same-key"))
    clock.now += 60
    await channel.send(envelope(PAYLOAD, JSON, attempt=2, key="same-key"))
    first, second = peer.seen
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "same-key"
    assert (first.headers["X-Refloop-Attempt"], second.headers["X-Refloop-Attempt"]) == ("1", "2")
    # Each attempt is signed afresh, so a receiver's replay window never rejects a retry.
    assert second.headers["X-Refloop-Timestamp"] == str(int(NOW) + 60)
    assert verify_signature(
        SIGNING_SECRET,
        second.headers["X-Refloop-Timestamp"],
        second.body,
        second.headers["X-Refloop-Signature"],
        now=clock.now,
    )


async def test_a_bearer_token_from_a_secret_file_is_sent(
    peer: Peer, build: Build, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("tok-123\n")
    peer.answer(ok())
    await build(url=peer.url(), token={"file": "token"}).send(envelope(PAYLOAD, JSON))
    assert peer.seen[0].headers["Authorization"] == "Bearer tok-123"


async def test_an_api_key_header_without_a_scheme(peer: Peer, build: Build, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("key-9")
    peer.answer(ok())
    channel = build(
        url=peer.url(), token={"file": "token"}, auth_header="X-Api-Key", auth_scheme=""
    )
    await channel.send(envelope(PAYLOAD, JSON))
    assert peer.seen[0].headers["X-Api-Key"] == "key-9"


async def test_a_missing_token_is_permanent_and_nothing_is_sent(peer: Peer, build: Build) -> None:
    peer.answer(ok())
    channel = build(url=peer.url(), token={"env": "REFLOOP_TEST_UNSET_WEBHOOK_TOKEN"})
    with pytest.raises(PermanentError, match="secret not set"):
        await channel.send(envelope(PAYLOAD, JSON))
    assert peer.seen == []


# --- where it goes -------------------------------------------------------------------


async def test_an_http_endpoint_overrides_the_configured_url(peer: Peer, build: Build) -> None:
    peer.answer(ok(), path="/specialist-7")
    channel = build(url=peer.url("/default"))
    await channel.send(envelope(PAYLOAD, JSON, endpoint=peer.url("/specialist-7")))
    assert [s.path for s in peer.seen] == ["/specialist-7"]


async def test_an_endpoint_that_is_not_a_url_falls_back_to_the_url(
    peer: Peer, build: Build
) -> None:
    peer.answer(ok())
    await build(url=peer.url()).send(envelope(PAYLOAD, JSON, endpoint="cardiology-team"))
    assert [s.path for s in peer.seen] == ["/hook"]


async def test_no_url_at_all_is_permanent(build: Build) -> None:
    with pytest.raises(PermanentError, match="no URL"):
        await build().send(envelope(PAYLOAD, JSON))


async def test_plain_http_beyond_loopback_is_refused_before_connecting(build: Build) -> None:
    channel = build()
    with pytest.raises(PermanentError, match="plain http"):
        await channel.send(envelope(PAYLOAD, JSON, endpoint="http://specialist.example/hook"))


def test_settings_refuse_plain_http_beyond_loopback_unless_allowed(tmp_path: Path) -> None:
    table = {"type": "webhook", "signing_secret": {"env": "X"}}
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate({**table, "url": "http://specialist.example/hook"})
    assert any(p.startswith("url:") and "plain http" in p for p in caught.value.problems)
    registry.validate({**table, "url": "http://specialist.example/hook", "allow_plain_http": True})
    registry.validate({**table, "url": "https://specialist.example/hook"})
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate({**table, "url": "ftp://specialist.example/"})
    assert any(p.startswith("url:") for p in caught.value.problems)


def test_settings_require_a_signing_secret() -> None:
    with pytest.raises(ChannelConfigError) as caught:
        registry.validate({"type": "webhook", "url": "https://x.example/"})
    assert any(p.startswith("signing_secret") for p in caught.value.problems)


# --- receipts ------------------------------------------------------------------------


async def test_a_location_header_is_the_peer_reference(peer: Peer, build: Build) -> None:
    peer.answer(Response("", status=202, headers={"Location": "/events/77"}))
    receipt = await build(url=peer.url()).send(envelope(PAYLOAD, JSON))
    assert receipt == Receipt(peer_reference="/events/77", detail="HTTP 202")


async def test_a_2xx_with_a_body_that_is_not_json_is_still_a_receipt(
    peer: Peer, build: Build
) -> None:
    # The peer said it took the delivery; resending would only duplicate it.
    peer.answer(Response("<html>thanks</html>", status=200, content_type="text/html"))
    receipt = await build(url=peer.url()).send(envelope(PAYLOAD, JSON))
    assert receipt == Receipt(peer_reference="", detail="HTTP 200", confirmed=True)


async def test_an_id_that_is_free_text_is_not_a_reference(peer: Peer, build: Build) -> None:
    peer.answer(ok({"id": f"received {SECRET_MARKER}"}))
    receipt = await build(url=peer.url()).send(envelope(PAYLOAD, JSON))
    assert receipt.peer_reference == ""


# --- fault injection -----------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 425])
async def test_server_errors_and_not_now_statuses_are_retryable(
    peer: Peer, build: Build, status: int
) -> None:
    peer.answer(ok(status=status))
    with pytest.raises(RetryableError) as caught:
        await build(url=peer.url()).send(envelope(PAYLOAD, JSON))
    assert caught.value.reason == f"HTTP {status}"
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_in_seconds_is_passed_on(peer: Peer, build: Build, status: int) -> None:
    peer.answer(Response("", status=status, headers={"Retry-After": "17"}))
    with pytest.raises(RetryableError) as caught:
        await build(url=peer.url()).send(envelope(PAYLOAD, JSON))
    assert caught.value.retry_after == 17.0


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_as_an_http_date_is_seconds_from_the_clock(
    peer: Peer, build: Build, status: int
) -> None:
    when = formatdate(NOW + 120, usegmt=True)
    peer.answer(Response("", status=status, headers={"Retry-After": when}))
    with pytest.raises(RetryableError) as caught:
        await build(url=peer.url()).send(envelope(PAYLOAD, JSON))
    assert caught.value.retry_after == 120.0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
async def test_client_errors_are_permanent_and_never_quote_the_body(
    peer: Peer, build: Build, status: int
) -> None:
    body = {"error": "invalid_request", "message": f"bad patient {SECRET_MARKER}"}
    peer.answer(ok(body, status=status))
    marked = PAYLOAD.replace(b"Referral", SECRET_MARKER.encode())
    with pytest.raises(PermanentError) as caught:
        await build(url=peer.url()).send(envelope(marked, JSON))
    assert caught.value.reason == f"HTTP {status}, code invalid_request"
    assert SECRET_MARKER not in str(caught.value)


async def test_a_client_error_whose_code_is_free_text_names_only_the_status(
    peer: Peer, build: Build
) -> None:
    peer.answer(ok({"error": f"no such patient {SECRET_MARKER}"}, status=400))
    with pytest.raises(PermanentError) as caught:
        await build(url=peer.url()).send(envelope(PAYLOAD, JSON))
    assert caught.value.reason == "HTTP 400"


async def test_a_redirect_is_permanent_and_not_followed(peer: Peer, build: Build) -> None:
    peer.answer(ok(), path="/elsewhere")
    peer.answer(Response("", status=307, headers={"Location": peer.url("/elsewhere")}))
    with pytest.raises(PermanentError, match="HTTP 307 redirect not followed"):
        await build(url=peer.url()).send(envelope(PAYLOAD, JSON))
    assert [s.path for s in peer.seen] == ["/hook"]


async def test_a_peer_slower_than_the_timeout_is_retryable(peer: Peer, build: Build) -> None:
    channel = build(url=peer.url(), timeout_seconds=0.3)
    loop = asyncio.get_running_loop()
    with stalled(ok()) as stall:
        peer.answer(stall)
        started = loop.time()
        with pytest.raises(RetryableError, match="timeout"):
            await channel.send(envelope(PAYLOAD, JSON))
        assert loop.time() - started < 3


async def _raw_peer(reply: bytes) -> tuple[asyncio.Server, int]:
    """A TCP peer that reads the request head and answers ``reply`` (not HTTP)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    "reply",
    [f"{SECRET_MARKER} is not HTTP\r\n\r\n".encode(), b""],
    ids=["garbage", "hang-up"],
)
async def test_a_peer_that_breaks_http_is_retryable_and_never_quoted(
    build: Build, reply: bytes
) -> None:
    srv, port = await _raw_peer(reply)
    try:
        with pytest.raises(RetryableError) as caught:
            await build(url=f"http://127.0.0.1:{port}/hook").send(envelope(PAYLOAD, JSON))
        assert caught.value.reason == "HTTP peer broke the protocol (RemoteProtocolError)"
        assert SECRET_MARKER not in str(caught.value)
    finally:
        srv.close()
        await srv.wait_closed()


async def test_aclose_is_idempotent_and_the_channel_reopens(peer: Peer, build: Build) -> None:
    peer.answer(ok())
    channel = build(url=peer.url())
    await channel.send(envelope(PAYLOAD, JSON))
    await channel.aclose()
    await channel.aclose()
    await channel.send(envelope(PAYLOAD, JSON))
    assert len(peer.seen) == 2


async def test_a_peer_that_is_down_is_named_by_its_os_error(build: Build) -> None:
    with pytest.raises(RetryableError) as caught:
        await build(url=f"http://127.0.0.1:{free_port()}/hook").send(envelope(PAYLOAD, JSON))
    assert caught.value.reason == "HTTP connect failed (ECONNREFUSED)"
