"""The plumbing the channels share, table by table: HTTP outcome classification, the
small HTTP helpers (``channels._http``), config paths and CA trust (``channels._common``),
and the HTTP client against a real HTTPS peer on loopback that only a test CA vouches for.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_httpserver import HTTPServer

from channels._common import CaFileError, ca_context, config_path
from channels._http import (
    HttpClient,
    HttpSettings,
    TokenAuthSettings,
    auth_headers,
    classify_exception,
    classify_response,
    error_code,
    httpx_verify,
    json_object,
    media_type,
    parse_retry_after,
    short_token,
    url_problem,
)
from channels.base import ChannelContext, PermanentError, RetryableError
from tests.channels.contract import SECRET_MARKER
from tests.integration.certs import Pki, make_pki

NOW = 1_760_000_000.0


# --- outcome classification (pure) ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        ("120", 120.0),
        (" 5 ", 5.0),
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW - 30, usegmt=True), 0.0),  # already past: retry now
        ("Sunday, 06-Nov-94 08:49:37 GMT", 0.0),  # RFC 850 form, long past
        ("soon", None),
        ("-5", None),
        ("1.5", None),  # delay-seconds is an integer
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"code": 21211, "message": "The To number +15551234567 is not valid"}', "21211"),
        (b'{"error": "invalid_token", "error_description": "expired"}', "invalid_token"),
        (b'{"error": {"code": "RATE_LIMITED", "message": "slow down"}}', "RATE_LIMITED"),
        (b'{"errors": [{"code": "E42", "detail": "x"}]}', "E42"),
        (b'[{"code": "first"}, {"code": "second"}]', "first"),
        (b'{"error": "Patient John Smith not found"}', None),
        (b'{"code": true}', None),
        (b'{"code": ' + b"9" * 60 + b"}", None),  # a number that long is not a code
        (b"[" * 50_000 + b"]" * 50_000, None),  # nesting past the parser's limit
        (b"\xff\xfe{", None),
        (b'{"message": "nothing machine-readable"}', None),
        (b"<html>502 Bad Gateway</html>", None),
        (b"", None),
        (b'{"code": "' + b"x" * 41 + b'"}', None),
    ],
)
def test_error_code_takes_only_short_machine_tokens(body: bytes, expected: str | None) -> None:
    assert error_code(body) == expected


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, None),
        (201, None),
        (204, None),
        (301, PermanentError),
        (304, PermanentError),
        (400, PermanentError),
        (404, PermanentError),
        (408, RetryableError),
        (429, RetryableError),
        (451, PermanentError),
        (500, RetryableError),
        (503, RetryableError),
        (599, RetryableError),
    ],
)
def test_classify_response(status: int, kind: type[Exception] | None) -> None:
    error = classify_response(httpx.Response(status), now=NOW)
    assert (type(error) if error else None) is kind


@pytest.mark.parametrize(
    ("exc", "kind", "says"),
    [
        (httpx.ConnectError("x"), RetryableError, "HTTP connect failed"),
        (httpx.ConnectTimeout("x"), RetryableError, "HTTP connect timeout"),
        (httpx.ReadTimeout("x"), RetryableError, "HTTP read timeout"),
        (httpx.ReadError("x"), RetryableError, "HTTP read failed"),
        (httpx.RemoteProtocolError(SECRET_MARKER), RetryableError, "HTTP peer broke"),
        (httpx.WriteError("x"), RetryableError, "HTTP request failed (WriteError)"),
        (TimeoutError(), RetryableError, "HTTP timeout"),
        (httpx.UnsupportedProtocol("x"), PermanentError, "HTTP request impossible"),
    ],
)
def test_classify_exception(exc: Exception, kind: type[Exception], says: str) -> None:
    error = classify_exception(exc)
    assert type(error) is kind
    assert error.reason.startswith(says)
    assert SECRET_MARKER not in error.reason


def test_classify_exception_names_the_os_cause() -> None:
    exc = httpx.ConnectError("All connection attempts failed")
    exc.__cause__ = OSError("All connection attempts failed")
    exc.__cause__.__cause__ = ConnectionRefusedError(111, "Connect call failed")
    assert classify_exception(exc).reason == "HTTP connect failed (ECONNREFUSED)"


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://gw.example/v1", True),
        ("http://127.0.0.1:8080/x", True),
        ("http://localhost/x", True),
        ("http://[::1]:9/x", True),
        ("http://gw.example/v1", False),
        ("ftp://gw.example/", False),
        ("gw.example/v1", False),
        ("", False),
    ],
)
def test_url_problem(url: str, allowed: bool) -> None:
    assert (url_problem(url, allow_plain_http=False) is None) is allowed


# --- the small HTTP helpers (pure) ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("SM0123", "SM0123"),
        (42, "42"),
        ("/events/77", "/events/77"),
        ("received for John Smith", ""),  # a sentence is not an id
        ("x" * 129, ""),
        ("", ""),
        (True, ""),
        (None, ""),
        (["SM1"], ""),
        ({"id": "SM1"}, ""),
    ],
)
def test_short_token(value: Any, expected: str) -> None:
    assert short_token(value) == expected


def test_short_token_limit() -> None:
    assert short_token("x" * 40, limit=40) == "x" * 40
    assert short_token("x" * 41, limit=40) == ""


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"id": "evt-1"}', {"id": "evt-1"}),
        (b"[1, 2]", None),
        (b'"evt-1"', None),
        (b"<html>thanks</html>", None),
        (b"\xff\xfe", None),
        (b"", None),
    ],
)
def test_json_object(content: bytes, expected: dict[str, Any] | None) -> None:
    assert json_object(httpx.Response(200, content=content)) == expected


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("text/plain", "text/plain"),
        ("text/plain; charset=utf-8", "text/plain"),
        (" Application/PDF ", "application/pdf"),
        ("", ""),
    ],
)
def test_media_type(content_type: str, expected: str) -> None:
    assert media_type(content_type) == expected


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({}, {"Authorization": "Bearer tok-1"}),
        ({"auth_scheme": "Token"}, {"Authorization": "Token tok-1"}),
        ({"auth_header": "X-Api-Key", "auth_scheme": ""}, {"X-Api-Key": "tok-1"}),
    ],
)
def test_auth_headers_read_the_token_now(
    tmp_path: Path, auth: dict[str, str], expected: dict[str, str]
) -> None:
    (tmp_path / "token").write_text("tok-1\n")
    settings = TokenAuthSettings(type="t", token={"file": "token"}, **auth)
    assert auth_headers(settings, tmp_path) == expected
    (tmp_path / "token").write_text("tok-2\n")  # rotated: the next request sends the new one
    assert "tok-2" in next(iter(auth_headers(settings, tmp_path).values()))


def test_auth_headers_without_a_token_are_empty(tmp_path: Path) -> None:
    assert auth_headers(TokenAuthSettings(type="t"), tmp_path) == {}


# --- config paths and CA trust (channels._common) ------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("ca.pem", "/etc/refloop/ca.pem"),
        ("tls/ca.pem", "/etc/refloop/tls/ca.pem"),
        ("../shared/ca.pem", "/etc/refloop/../shared/ca.pem"),
        ("/srv/pki/ca.pem", "/srv/pki/ca.pem"),
    ],
)
def test_config_path_is_relative_to_the_config_folder(path: str, expected: str) -> None:
    assert config_path(Path(path), Path("/etc/refloop")) == Path(expected)


def test_without_a_ca_file_the_system_store_is_trusted_and_checked(tmp_path: Path) -> None:
    ctx = ca_context(None, tmp_path)
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.check_hostname
    # httpx keeps its own default trust; only a ca_file replaces it.
    assert httpx_verify(None, tmp_path) is True


def test_a_ca_file_is_the_only_trust(pki: Pki) -> None:
    ctx = ca_context(Path(pki.ca_cert.name), pki.ca_cert.parent)
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert [c["subject"] for c in ctx.get_ca_certs()] == [
        ((("organizationName", "refloop tests"),), (("commonName", "refloop test CA"),))
    ]
    assert isinstance(httpx_verify(pki.ca_cert, Path("/nowhere")), ssl.SSLContext)


@pytest.mark.parametrize(
    ("content", "cause"),
    [(None, FileNotFoundError), (b"not a certificate\n", ssl.SSLError)],
    ids=["missing", "not-pem"],
)
def test_an_unusable_ca_file_names_the_resolved_path_and_the_cause(
    tmp_path: Path, content: bytes | None, cause: type[Exception]
) -> None:
    if content is not None:
        (tmp_path / "ca.pem").write_bytes(content)
    with pytest.raises(CaFileError) as caught:
        ca_context(Path("ca.pem"), tmp_path)
    assert caught.value.path == tmp_path / "ca.pem"
    assert isinstance(caught.value.cause, cause)


# --- the HTTP client against a real HTTPS peer ---------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https_server(pki: Pki) -> Iterator[HTTPServer]:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki.server_cert, pki.server_key)
    srv = HTTPServer(host="127.0.0.1", port=0, ssl_context=tls)
    srv.start()
    yield srv
    srv.clear()
    srv.stop()


MakeClient = Callable[..., HttpClient]


@pytest.fixture
async def client(pki: Pki) -> AsyncIterator[MakeClient]:
    made: list[HttpClient] = []

    def make(**raw: Any) -> HttpClient:
        settings = HttpSettings(type="test", **raw)
        http = HttpClient(settings, ChannelContext(base_dir=pki.ca_cert.parent, clock=lambda: NOW))
        made.append(http)
        return http

    yield make
    for http in made:
        await http.aclose()


async def test_a_ca_file_relative_to_the_config_lets_the_client_trust_the_peer(
    https_server: HTTPServer, pki: Pki, client: MakeClient
) -> None:
    https_server.clear()
    https_server.expect_request("/hook", method="POST").respond_with_data("ok", status=202)
    response = await client(ca_file=pki.ca_cert.name).request(
        "POST", https_server.url_for("/hook"), content=b"{}"
    )
    assert response.status_code == 202
    assert response.request.headers["User-Agent"] == "refloop"


async def test_without_the_ca_file_the_peer_is_not_trusted(
    https_server: HTTPServer, client: MakeClient
) -> None:
    https_server.clear()
    https_server.expect_request("/hook").respond_with_data("ok")
    with pytest.raises(RetryableError) as caught:
        await client().request("POST", https_server.url_for("/hook"), content=b"{}")
    assert caught.value.reason == "HTTP connect failed (TLS CERTIFICATE_VERIFY_FAILED)"
    assert https_server.log == []


async def test_an_unusable_ca_file_is_permanent(
    https_server: HTTPServer, client: MakeClient
) -> None:
    https_server.clear()
    with pytest.raises(PermanentError) as caught:
        await client(ca_file="missing.pem").request("POST", https_server.url_for("/hook"))
    assert caught.value.reason.startswith("ca_file ")
    assert caught.value.reason.endswith("missing.pem unusable: FileNotFoundError")
