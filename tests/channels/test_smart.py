"""SMART Backend Services for the fhir channel: the pure token rules, a token endpoint on
pytest-httpserver that verifies our signed assertions with the public key, and SEKMET's
own SMART token endpoint as an independent implementation."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from channels import registry
from channels.base import (
    FHIR_JSON,
    Channel,
    ChannelContext,
    PermanentError,
    Receipt,
    RetryableError,
)
from channels.smart import (
    ASSERTION_LIFETIME,
    CLIENT_ASSERTION_TYPE,
    AccessToken,
    assertion_claims,
    signing_key,
    token_error,
    token_from_response,
    usable,
)
from tests.channels.contract import SECRET_MARKER, envelope
from tests.peers.sekmet import Sekmet

CLIENT_ID = "refloop-test-client"
KEY_ID = "refloop-key-1"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class Clock:
    """The injected wall clock; starts at real time so PyJWT's own exp check agrees."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


_KEYS: dict[str, PrivateKey] = {}


def key_for(algorithm: str) -> PrivateKey:
    if algorithm not in _KEYS:
        _KEYS[algorithm] = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if algorithm == "RS384"
            else ec.generate_private_key(ec.SECP384R1())
        )
    return _KEYS[algorithm]


# --- pure rules ------------------------------------------------------------------------


def test_assertion_claims_name_the_client_the_endpoint_and_expire_within_five_minutes() -> None:
    claims = assertion_claims(CLIENT_ID, "https://auth.example/token", 1000.7, "jti-1")
    assert claims == {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": "https://auth.example/token",
        "exp": 1000 + ASSERTION_LIFETIME,
        "jti": "jti-1",
    }
    assert 0 < claims["exp"] - 1000.7 <= 300


@pytest.mark.parametrize(
    ("expires_in", "now", "ok"),
    [
        (3600, 1000.0, True),  # just obtained
        (3600, 1000.0 + 3539, True),
        (3600, 1000.0 + 3540, False),  # 60 s margin on a long-lived token
        (300, 1000.0 + 269, True),
        (300, 1000.0 + 270, False),  # 10 % margin on a short one
        (300, 999.0, False),  # the clock went back past when we asked: do not trust it
    ],
)
def test_a_cached_token_is_used_until_shortly_before_it_expires(
    expires_in: float, now: float, ok: bool
) -> None:
    assert usable(AccessToken("t", obtained_at=1000.0, expires_in=expires_in), now) is ok


def test_no_token_is_not_usable() -> None:
    assert usable(None, 0.0) is False


def test_a_token_response_becomes_a_token() -> None:
    body = json.dumps({"access_token": "abc", "token_type": "Bearer", "expires_in": 900}).encode()
    assert token_from_response(body, obtained_at=5.0) == AccessToken("abc", 5.0, 900.0)
    body = json.dumps({"access_token": "abc", "token_type": "bearer"}).encode()
    assert token_from_response(body, obtained_at=5.0).expires_in == 300.0  # SMART's default


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"<html>maintenance</html>", RetryableError),
        (b'{"token_type": "bearer"}', RetryableError),
        (b'{"access_token": "abc", "token_type": "mac"}', PermanentError),
    ],
)
def test_an_unusable_token_response_is_an_error(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        token_from_response(body, obtained_at=0.0)


@pytest.mark.parametrize(
    ("status", "body", "retry_after", "error", "reason", "after"),
    [
        (
            400,
            {"error": "invalid_client", "error_description": f"no key for {SECRET_MARKER}"},
            None,
            PermanentError,
            "SMART token refused: invalid_client",
            None,
        ),
        (
            401,
            {"error": "invalid client"},
            None,
            PermanentError,
            "SMART token refused: HTTP 401",
            None,
        ),
        (
            400,
            {"error": "invalid_scope"},
            None,
            PermanentError,
            "SMART token refused: invalid_scope",
            None,
        ),
        (503, {}, "30", RetryableError, "SMART token endpoint HTTP 503", 30.0),
        (429, {}, None, RetryableError, "SMART token endpoint HTTP 429", None),
    ],
)
def test_token_endpoint_errors_say_the_oauth_code_only(
    status: int,
    body: dict[str, str],
    retry_after: str | None,
    error: type[Exception],
    reason: str,
    after: float | None,
) -> None:
    result = token_error(status, json.dumps(body).encode(), retry_after, now=0.0)
    assert isinstance(result, error)
    assert result.reason == reason
    assert getattr(result, "retry_after", None) == after


def test_the_key_must_fit_the_algorithm() -> None:
    rsa_pem = pem(key_for("RS384"))
    assert isinstance(signing_key(rsa_pem, "RS384"), rsa.RSAPrivateKey)
    with pytest.raises(PermanentError, match="P-384"):
        signing_key(rsa_pem, "ES384")
    with pytest.raises(PermanentError, match="P-384"):
        signing_key(pem(ec.generate_private_key(ec.SECP256R1())), "ES384")
    with pytest.raises(PermanentError, match="RSA"):
        signing_key(pem(key_for("ES384")), "RS384")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    with pytest.raises(PermanentError, match="2048"):
        signing_key(pem(weak), "RS384")
    with pytest.raises(PermanentError, match="PEM"):
        signing_key("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----", "RS384")


# --- a token endpoint and a FHIR server on pytest-httpserver ---------------------------


@dataclass
class SmartPeer:
    """A SMART token endpoint that verifies assertions as a server must, and a FHIR
    endpoint that accepts only the tokens it issued (and has not revoked)."""

    public_key: Any
    algorithm: str
    token_url: str
    clock: Clock
    expires_in: int = 600
    token_requests: int = 0
    refusals: list[str] = field(default_factory=list)
    jtis: set[str] = field(default_factory=set)
    valid: set[str] = field(default_factory=set)
    fhir_saw: list[str] = field(default_factory=list)
    accept_tokens: bool = True

    def token(self, request: Request) -> Response:
        self.token_requests += 1
        form = request.form
        try:
            assert form["grant_type"] == "client_credentials"
            assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
            assert form["scope"] == "system/*.rs system/*.cud"
            assertion = form["client_assertion"]
            header = jwt.get_unverified_header(assertion)
            assert header["typ"] == "JWT"
            assert header["kid"] == KEY_ID
            assert header["alg"] == self.algorithm
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=[self.algorithm],
                audience=self.token_url,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
            assert claims["iss"] == claims["sub"] == CLIENT_ID
            assert self.clock() < claims["exp"] <= self.clock() + 300
            assert claims["jti"] not in self.jtis, "jti reused"
            self.jtis.add(claims["jti"])
        except (AssertionError, KeyError, jwt.PyJWTError) as exc:
            self.refusals.append(repr(exc))
            return _json({"error": "invalid_client", "error_description": repr(exc)}, 401)
        value = f"tok-{self.token_requests}-{uuid.uuid4().hex[:8]}"
        self.valid.add(value)
        return _json(
            {"access_token": value, "token_type": "bearer", "expires_in": self.expires_in}, 200
        )

    def fhir(self, request: Request) -> Response:
        auth = request.headers.get("Authorization", "")
        self.fhir_saw.append(auth)
        if self.accept_tokens and auth.removeprefix("Bearer ") in self.valid:
            return Response("", status=201, headers={"Location": "Task/t1/_history/1"})
        return Response(
            "", status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )


def _json(data: dict[str, Any], status: int) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


@pytest.fixture(params=["RS384", "ES384"])
def algorithm(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def peer(httpserver: HTTPServer, algorithm: str, clock: Clock, tmp_path: Path) -> SmartPeer:
    key = key_for(algorithm)
    (tmp_path / "client.pem").write_text(pem(key))
    smart = SmartPeer(key.public_key(), algorithm, httpserver.url_for("/auth/token"), clock)
    httpserver.expect_request("/auth/token", method="POST").respond_with_handler(smart.token)
    httpserver.expect_request("/fhir/Task", method="POST").respond_with_handler(smart.fhir)
    return smart


@pytest.fixture
async def make_channel(tmp_path: Path, clock: Clock) -> AsyncIterator[Callable[..., Channel]]:
    built: list[Channel] = []

    def make(base_url: str, token_url: str, algorithm: str, **smart: Any) -> Channel:
        raw = {
            "type": "fhir",
            "base_url": base_url,
            "auth": "smart",
            "smart": {
                "token_url": token_url,
                "client_id": CLIENT_ID,
                "private_key": {"file": "client.pem"},
                "algorithm": algorithm,
                "key_id": KEY_ID,
                **smart,
            },
        }
        channel = registry.build("fhir-smart", raw, ChannelContext(base_dir=tmp_path, clock=clock))
        built.append(channel)
        return channel

    yield make
    for channel in built:
        await channel.aclose()


@pytest.fixture
def channel(
    httpserver: HTTPServer, peer: SmartPeer, make_channel: Callable[..., Channel]
) -> Channel:
    return make_channel(httpserver.url_for("/fhir"), peer.token_url, peer.algorithm)


def task_envelope(key: str = "k-1") -> Any:
    return envelope(b'{"resourceType":"Task"}', FHIR_JSON, key=key)


async def test_one_token_serves_several_sends(channel: Channel, peer: SmartPeer) -> None:
    for i in range(3):
        receipt = await channel.send(task_envelope(f"k-{i}"))
        assert receipt == Receipt(peer_reference="Task/t1/_history/1", detail="HTTP 201")
    assert peer.refusals == []
    assert peer.token_requests == 1
    assert len(set(peer.fhir_saw)) == 1
    assert peer.fhir_saw[0].removeprefix("Bearer ") in peer.valid


async def test_concurrent_sends_share_one_token_fetch(channel: Channel, peer: SmartPeer) -> None:
    receipts = await asyncio.gather(*(channel.send(task_envelope(f"k-{i}")) for i in range(5)))
    assert all(r.detail == "HTTP 201" for r in receipts)
    assert peer.token_requests == 1


async def test_a_token_is_refreshed_once_it_nears_expiry(
    channel: Channel, peer: SmartPeer, clock: Clock
) -> None:
    await channel.send(task_envelope())
    clock.now += peer.expires_in - 61  # inside the 60 s margin is still too early
    await channel.send(task_envelope())
    assert peer.token_requests == 1
    clock.now += 2  # now within the last minute: fetch a new one
    await channel.send(task_envelope())
    assert peer.refusals == []
    assert peer.token_requests == 2
    assert peer.fhir_saw[2] != peer.fhir_saw[1]


async def test_invalid_client_is_permanent_and_never_reaches_the_fhir_server(
    httpserver: HTTPServer, peer: SmartPeer, make_channel: Callable[..., Channel]
) -> None:
    # Signed for another audience: the endpoint refuses the assertion.
    channel = make_channel(
        httpserver.url_for("/fhir"), httpserver.url_for("/auth/token?other"), peer.algorithm
    )
    with pytest.raises(PermanentError) as caught:
        await channel.send(task_envelope())
    assert caught.value.reason == "SMART token refused: invalid_client"
    assert peer.refusals  # the endpoint said why; the reason does not repeat it
    assert peer.fhir_saw == []


async def test_a_token_endpoint_that_is_down_for_maintenance_is_retryable(
    httpserver: HTTPServer, make_channel: Callable[..., Channel], tmp_path: Path
) -> None:
    (tmp_path / "client.pem").write_text(pem(key_for("RS384")))
    httpserver.expect_request("/auth/token", method="POST").respond_with_data(
        "down", status=503, headers={"Retry-After": "30"}
    )
    channel = make_channel(httpserver.url_for("/fhir"), httpserver.url_for("/auth/token"), "RS384")
    with pytest.raises(RetryableError) as caught:
        await channel.send(task_envelope())
    assert caught.value.reason == "SMART token endpoint HTTP 503"
    assert caught.value.retry_after == 30.0
    assert [entry[0].path for entry in httpserver.log] == ["/auth/token"]


async def test_an_unreachable_token_endpoint_is_retryable(
    httpserver: HTTPServer, make_channel: Callable[..., Channel], tmp_path: Path
) -> None:
    (tmp_path / "client.pem").write_text(pem(key_for("RS384")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = s.getsockname()[1]
    channel = make_channel(httpserver.url_for("/fhir"), f"http://127.0.0.1:{nobody}/token", "RS384")
    with pytest.raises(RetryableError) as caught:
        await channel.send(task_envelope())
    assert caught.value.reason.startswith("SMART token endpoint: HTTP connect failed")


async def test_a_401_drops_the_cached_token_and_the_next_attempt_gets_a_new_one(
    channel: Channel, peer: SmartPeer
) -> None:
    await channel.send(task_envelope())
    peer.valid.clear()  # the server revoked it (or it expired early)

    with pytest.raises(RetryableError) as caught:
        await channel.send(task_envelope())
    assert caught.value.reason == "HTTP 401 invalid_token: SMART access token refused, dropped"

    receipt = await channel.send(task_envelope())
    assert receipt.detail == "HTTP 201"
    assert peer.token_requests == 2


async def test_a_fresh_token_that_is_refused_is_permanent(
    channel: Channel, peer: SmartPeer
) -> None:
    peer.accept_tokens = False  # e.g. the scopes granted do not cover Task
    with pytest.raises(PermanentError) as caught:
        await channel.send(task_envelope())
    assert "freshly issued" in caught.value.reason
    assert peer.token_requests == 1


async def test_a_missing_private_key_is_permanent_before_any_request(
    httpserver: HTTPServer, make_channel: Callable[..., Channel]
) -> None:
    channel = make_channel(httpserver.url_for("/fhir"), httpserver.url_for("/auth/token"), "RS384")
    with pytest.raises(PermanentError) as caught:
        await channel.send(task_envelope())
    assert "client.pem" in caught.value.reason
    assert httpserver.log == []


# --- SEKMET's SMART server: another implementation verifies our assertions -------------


@pytest.fixture(scope="module")
def sekmet_smart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    clients = []
    for algorithm in ("RS384", "ES384"):
        public = key_for(algorithm).public_key()
        to_jwk = RSAAlgorithm.to_jwk if algorithm == "RS384" else ECAlgorithm.to_jwk
        jwk = {**to_jwk(public, as_dict=True), "kid": KEY_ID, "alg": algorithm}
        clients.append(
            {
                "client_id": f"{CLIENT_ID}-{algorithm}",
                "jwks": {"keys": [jwk]},
                "scopes": "system/*.*",
            }
        )
    with Sekmet.start(tmp_path_factory.mktemp("sekmet-smart"), smart_clients=clients) as handle:
        yield handle


async def test_sekmet_issues_a_token_for_our_assertion_and_accepts_it(
    sekmet_smart: Any, algorithm: str, tmp_path: Path
) -> None:
    (tmp_path / "client.pem").write_text(pem(key_for(algorithm)))
    raw = {
        "type": "fhir",
        "base_url": sekmet_smart.base_url,
        "auth": "smart",
        "smart": {
            "token_url": sekmet_smart.token_url,
            "client_id": f"{CLIENT_ID}-{algorithm}",
            "private_key": {"file": "client.pem"},
            "algorithm": algorithm,
            "key_id": KEY_ID,
        },
    }
    # SEKMET checks exp against its own clock: the channel runs on the real one here.
    channel = registry.build("fhir-sekmet", raw, ChannelContext(base_dir=tmp_path))
    try:
        task = {"resourceType": "Task", "status": "requested", "intent": "order"}
        receipt = await channel.send(envelope(json.dumps(task).encode(), FHIR_JSON))
        again = await channel.send(envelope(json.dumps(task).encode(), FHIR_JSON, key="k-2"))
    finally:
        await channel.aclose()
    assert receipt.detail == "HTTP 201"
    assert receipt.peer_reference.startswith("Task/")
    assert again.peer_reference != receipt.peer_reference
    # Without a token SEKMET refuses: the 201s above were the token's doing.
    with sekmet_smart.client() as client:
        assert client.post("/Task", json=task).status_code == 401
