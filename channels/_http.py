"""Shared HTTP plumbing for the HTTP channels (webhook, sms, fax, and HTTP plugins).

Theory of operation
-------------------
Every HTTP attempt ends one of three ways, and two pure functions decide which:

* :func:`classify_exception` — no answer came (refused, reset, timed out, a peer that
  spoke broken HTTP): always a :class:`RetryableError`, except a URL httpx cannot even
  try (a permanent configuration problem);
* :func:`classify_response` — an answer came: ``None`` for a 2xx; a retryable error for
  408, 425, 429 and 5xx (with the peer's ``Retry-After`` when it sent one, in seconds or
  as an HTTP date); a permanent error for every other 4xx and for 3xx — redirects are
  never followed, so a payload with PHI only goes to the URL an operator configured.

Reasons name the status and at most a machine code from a JSON error body (Twilio's
numeric ``code``, an OAuth-style ``"error": "invalid_token"``) when it is a short token.
A peer's free text (``message``, ``detail``) may echo the payload, so it is never quoted.

:class:`HttpClient` is the thin shell: one lazily created ``httpx.AsyncClient`` per
channel, made by :func:`async_client` (TLS verified, optionally against ``ca_file``;
redirects never followed). :meth:`HttpClient.request` bounds each request by
``timeout_seconds`` as a whole, not only per socket operation, and returns a 2xx response
or raises the classified error. :class:`HttpChannel` is what the channels built on it
share (construction and ``aclose``). The fhir channel reads non-2xx answers itself, so it
keeps its own client, made by the same :func:`async_client` and :func:`httpx_verify`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import re
import ssl
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from pydantic import ValidationInfo, field_validator

from channels._common import CaFileError, ca_context
from channels.base import (
    ChannelContext,
    ChannelError,
    ChannelSettings,
    PermanentError,
    RetryableError,
    Secret,
)

USER_AGENT = "refloop"

#: Statuses that say "not now" rather than "never" (RFC 9110 408, RFC 8470 425, RFC 6585 429).
RETRYABLE_4XX = frozenset({408, 425, 429})

# A machine code a peer puts in an error body: short, no spaces, so not a sentence that
# could quote what we sent.
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,39}")
_CODE_KEYS = ("code", "error_code", "errorCode", "error")
_MAX_ERROR_BODY = 64 * 1024
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z\-]+")


class HttpSettings(ChannelSettings):
    """Keys every HTTP channel takes."""

    # PEM bundle of the CAs to trust instead of the system store (a private gateway CA).
    ca_file: Path | None = None
    # Plain http is refused except to loopback; set this only behind a TLS-terminating
    # sidecar or on a network where the operator accepts unencrypted PHI.
    allow_plain_http: bool = False


class TokenAuthSettings(HttpSettings):
    """An HTTP channel authenticated by one header carrying a secret token."""

    auth_header: str = "Authorization"
    auth_scheme: str = "Bearer"  # "" sends the bare token (``X-Api-Key: <token>``)
    token: Secret | None = None

    @field_validator("auth_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME.fullmatch(value):
            raise ValueError("not an HTTP header name")
        return value

    @field_validator("auth_scheme")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if value and not _HEADER_NAME.fullmatch(value):
            raise ValueError("an auth scheme is one word (Bearer, Token) or empty")
        return value


def auth_headers(settings: TokenAuthSettings, base: Path) -> dict[str, str]:
    """The auth header, read from its secret now (so a rotated token is picked up);
    empty when no token is configured. A missing secret is a :class:`PermanentError`."""
    if settings.token is None:
        return {}
    token = settings.token.read(base)
    value = f"{settings.auth_scheme} {token}" if settings.auth_scheme else token
    return {settings.auth_header: value}


def url_problem(url: str, *, allow_plain_http: bool) -> str | None:
    """Why ``url`` may not carry a delivery, or None. Pure."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "not a URL"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "not an http(s) URL"
    if parsed.scheme == "http" and not allow_plain_http and not _is_loopback(parsed.host):
        return "plain http is only allowed to loopback (set allow_plain_http to override)"
    return None


def checked_url(value: str, info: ValidationInfo) -> str:
    """A settings validator's half: ``value`` if it may carry deliveries under the
    model's ``allow_plain_http`` (declared earlier, so already in ``info.data``)."""
    problem = url_problem(value, allow_plain_http=bool(info.data.get("allow_plain_http")))
    if problem:
        raise ValueError(problem)
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: delay-seconds or an HTTP date (RFC 9110
    10.2.3). None when absent or unreadable; a date in the past is 0. Pure."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; the obsolete forms come naive
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def error_code(body: bytes) -> str | None:
    """A machine code from a JSON error body, if it holds a short token. Pure."""
    if not body or len(body) > _MAX_ERROR_BODY:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return _code_in(data)


def _code_in(data: Any, depth: int = 0) -> str | None:
    if depth > 3:  # error bodies nest a level or two; deeper is not an error envelope
        return None
    if isinstance(data, list) and data:
        return _code_in(data[0], depth + 1)  # a list of errors names the first one first
    if not isinstance(data, Mapping):
        return None
    for key in _CODE_KEYS:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and _CODE.fullmatch(value):
            return value
        if isinstance(value, Mapping):  # {"error": {"code": ...}}
            nested = _code_in(value, depth + 1)
            if nested:
                return nested
    errors = data.get("errors")
    return _code_in(errors, depth + 1) if isinstance(errors, list) else None


def classify_response(response: httpx.Response, *, now: float) -> ChannelError | None:
    """None for a 2xx, else the error the status means. ``now`` (unix seconds) turns a
    ``Retry-After`` date into seconds. Pure: reads only the (already read) response."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    reason = f"HTTP {status}"
    if 300 <= status < 400:
        return PermanentError(f"{reason} redirect not followed (configure the final URL)")
    code = error_code(response.content)
    if code:
        reason += f", code {code}"
    if status in RETRYABLE_4XX or status >= 500 or status < 200:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now=now)
        return RetryableError(reason, retry_after=retry_after)
    return PermanentError(reason)


def classify_exception(exc: Exception) -> ChannelError:
    """The error for a request that got no answer. Never quotes the exception's text:
    protocol errors may carry the peer's bytes; only its kind and an OS/TLS cause."""
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return PermanentError("HTTP request impossible: unsupported or invalid URL")
    if isinstance(exc, TimeoutError):
        return RetryableError("HTTP timeout (whole attempt)")
    if isinstance(exc, httpx.TimeoutException):
        kind = type(exc).__name__.removesuffix("Timeout").lower() or "request"
        return RetryableError(f"HTTP {kind} timeout")
    if isinstance(exc, httpx.ConnectError):
        cause = _os_cause(exc)
        return RetryableError(f"HTTP connect failed ({cause})" if cause else "HTTP connect failed")
    if isinstance(exc, httpx.RemoteProtocolError):
        return RetryableError("HTTP peer broke the protocol (RemoteProtocolError)")
    if isinstance(exc, httpx.ReadError):
        return RetryableError("HTTP read failed (connection lost)")
    return RetryableError(f"HTTP request failed ({type(exc).__name__})")


def _os_cause(exc: BaseException) -> str | None:
    """An errno name (ECONNREFUSED) or a TLS reason (CERTIFICATE_VERIFY_FAILED) from the
    exception's chain: library constants, safe to log and useful to an operator."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return f"TLS {seen.reason}" if seen.reason else "TLS handshake failed"
        if isinstance(seen, OSError) and seen.errno:
            return errno.errorcode.get(seen.errno, f"errno {seen.errno}")
        seen = seen.__cause__ or seen.__context__
    return None


def httpx_verify(ca_file: Path | None, base: Path) -> ssl.SSLContext | bool:
    """httpx's ``verify``: its own default trust without ``ca_file``, else only the CAs in
    ``ca_file`` (relative to ``base``). Raises :class:`~channels._common.CaFileError`."""
    return True if ca_file is None else ca_context(ca_file, base)


def async_client(timeout_seconds: float, verify: ssl.SSLContext | bool) -> httpx.AsyncClient:
    """An httpx client as every HTTP channel uses one: redirects never followed (a payload
    with PHI only goes to the URL an operator configured), refloop's User-Agent."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_seconds),
        verify=verify,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )


class HttpClient:
    """One channel's HTTP connection pool, created on first use, closed by :meth:`aclose`."""

    def __init__(self, settings: HttpSettings, context: ChannelContext) -> None:
        self.settings = settings
        self.context = context
        self._client: httpx.AsyncClient | None = None

    def _get(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = async_client(self.settings.timeout_seconds, self._verify())
        return self._client

    def _verify(self) -> ssl.SSLContext | bool:
        try:
            return httpx_verify(self.settings.ca_file, self.context.base_dir)
        except CaFileError as exc:
            # An operator must fix the file; no attempt can succeed until then.
            kind = type(exc.cause).__name__
            raise PermanentError(f"ca_file {exc.path} unusable: {kind}") from None

    def check_url(self, url: str) -> None:
        problem = url_problem(url, allow_plain_http=self.settings.allow_plain_http)
        if problem:
            raise PermanentError(f"URL refused: {problem}")

    async def request(
        self, method: str, url: str, *, within: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send one request (``kwargs`` go to ``httpx.AsyncClient.request``); return the
        2xx response or raise the classified :class:`ChannelError`. The request takes at
        most ``timeout_seconds``, or ``within`` seconds when that is less (what is left of
        an attempt that makes several requests)."""
        self.check_url(url)
        client = self._get()
        limit = self.settings.timeout_seconds
        if within is not None:
            limit = max(0.0, min(within, limit))
        try:
            async with asyncio.timeout(limit):
                response = await client.request(method, url, **kwargs)
        except (httpx.RequestError, httpx.InvalidURL, TimeoutError) as exc:
            raise classify_exception(exc) from None
        error = classify_response(response, now=self.context.clock())
        if error is not None:
            raise error
        return response

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


_S = TypeVar("_S", bound=HttpSettings)


class HttpChannel(Generic[_S]):
    """A channel that sends through one :class:`HttpClient`; subclasses set ``Settings``
    (the plugin's model) and write ``send``."""

    def __init__(self, name: str, settings: _S, context: ChannelContext) -> None:
        self.name = name
        self.settings = settings
        self.context = context
        self.http = HttpClient(settings, context)

    async def aclose(self) -> None:
        await self.http.aclose()


def json_object(response: httpx.Response) -> Mapping[str, Any] | None:
    """The response body as a JSON object, or None when it is not one."""
    if not response.content:
        return None
    try:
        data = json.loads(response.content)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, Mapping) else None


def short_token(value: Any, limit: int = 128) -> str:
    """A peer's identifier as a string if it looks like one (no whitespace, bounded), else
    "" — an id field that holds a sentence is not an id."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return ""
    text = str(value)
    if not text or len(text) > limit or any(c.isspace() for c in text):
        return ""
    return text


def media_type(content_type: str) -> str:
    """``text/plain; charset=utf-8`` → ``text/plain``."""
    return content_type.split(";", 1)[0].strip().lower()


__all__ = [
    "RETRYABLE_4XX",
    "USER_AGENT",
    "HttpChannel",
    "HttpClient",
    "HttpSettings",
    "TokenAuthSettings",
    "async_client",
    "auth_headers",
    "checked_url",
    "classify_exception",
    "classify_response",
    "error_code",
    "httpx_verify",
    "json_object",
    "media_type",
    "parse_retry_after",
    "short_token",
    "url_problem",
]
