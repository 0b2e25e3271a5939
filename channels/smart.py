"""SMART Backend Services: access tokens for system-to-system FHIR calls.

Theory of operation
-------------------
SMART Backend Services (SMART App Launch STU2, "client-confidential-asymmetric") is
OAuth 2 client credentials where the client proves who it is with a JWT it signs with
its own private key (RS384 or ES384) instead of a shared secret. The server holds our
public key (registered out of band, usually as a JWK Set) and answers a form POST

    grant_type=client_credentials & scope=... &
    client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer &
    client_assertion=<JWT: iss = sub = client_id, aud = token URL, exp <= 5 min, jti>

with ``{"access_token", "token_type": "bearer", "expires_in"}``. The FHIR channel then
sends ``Authorization: Bearer <access_token>`` until the token nears its expiry.

The decisions are pure and take ``now`` (unix seconds) as an argument:
:func:`assertion_claims` (what the JWT says), :func:`usable` (may a cached token still
be sent), :func:`token_from_response` and :func:`token_error` (what the token endpoint
answered). :class:`SmartTokenClient` is the shell: it reads the private key from its
:class:`Secret` each time it signs (a rotated key file is picked up without a restart),
keeps one token per channel, and lets concurrent sends share one fetch (an
:class:`asyncio.Lock`), so a burst of deliveries costs one token request.

Errors never quote the token endpoint's ``error_description`` (a server's free text);
only the registered OAuth ``error`` code, which is a short token.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from channels._http import classify_exception, parse_retry_after, url_problem
from channels.base import ChannelContext, ChannelError, PermanentError, RetryableError, Secret

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

#: How far ahead the assertion expires. SMART allows at most five minutes; a minute less
#: leaves room for our clock running ahead of the server's.
ASSERTION_LIFETIME = 240

#: A token is dropped this long before the server says it expires, so a request that
#: leaves just before expiry does not arrive just after: 10 % of its life, at most 60 s.
MARGIN_FRACTION = 0.1
MAX_MARGIN = 60.0

#: ``expires_in`` is REQUIRED in SMART token responses; when a server leaves it out we
#: assume SMART's recommended five-minute lifetime rather than keep the token forever.
DEFAULT_EXPIRES_IN = 300.0

# RFC 6749 5.2 error codes are printable ASCII; we show only word-like ones.
_OAUTH_ERROR = re.compile(r"[a-z][a-z0-9_.\-]{0,63}")


class SmartSettings(BaseModel):
    """``[channels.<name>.smart]``: this client's registration at the FHIR server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_url: str
    client_id: str = Field(min_length=1)
    # PEM text (unencrypted PKCS#8 or traditional) of the key whose public half is
    # registered at the server, from an environment variable or a file.
    private_key: Secret
    algorithm: Literal["RS384", "ES384"] = "RS384"
    # The JWK "kid" the server knows the key by. SMART requires it in the JWT header;
    # a server that holds a single key per client may do without.
    key_id: str | None = Field(default=None, min_length=1)
    # SMART v2 scopes: system/<type or *>.<c r u d s in that order>.
    scope: str = "system/*.rs system/*.cud"
    # Plain http is only for loopback (tests, a sidecar), as for the channels.
    allow_plain_http: bool = False

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str) -> str:
        if not value.split() or not value.isprintable():
            raise ValueError("one or more space-separated scopes, e.g. system/*.rs")
        return " ".join(value.split())

    @model_validator(mode="after")
    def _token_url(self) -> SmartSettings:
        problem = url_problem(self.token_url, allow_plain_http=self.allow_plain_http)
        if problem:
            raise ValueError(f"token_url: {problem}")
        return self


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str
    obtained_at: float  # when we asked for it: its life is counted from then, not arrival
    expires_in: float
    serial: int = 0  # which fetch of its client brought it (1, 2, ...)

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.expires_in


def assertion_claims(client_id: str, token_url: str, now: float, jti: str) -> dict[str, Any]:
    """The client assertion's claims at ``now``. Pure.

    No ``iat`` or ``nbf``: both are optional in SMART, and a server whose clock is a
    little behind ours would refuse an assertion "issued in the future"."""
    return {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "exp": int(now) + ASSERTION_LIFETIME,
        "jti": jti,
    }


def usable(token: AccessToken | None, now: float) -> bool:
    """May ``token`` still be sent at ``now``? Pure."""
    if token is None:
        return False
    margin = min(MAX_MARGIN, token.expires_in * MARGIN_FRACTION)
    return token.obtained_at <= now < token.expires_at - margin


def token_from_response(body: bytes, obtained_at: float) -> AccessToken:
    """The token in a 200 answer, or the error why it cannot be used. Pure."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, Mapping):
        # A proxy's maintenance page answers 200 too: worth another try later.
        raise RetryableError("SMART token response is not a JSON object")
    value = data.get("access_token")
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise RetryableError("SMART token response has no usable access_token")
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise PermanentError("SMART token response: token_type is not bearer")
    expires_in = data.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    return AccessToken(value=value, obtained_at=obtained_at, expires_in=float(expires_in))


def token_error(status: int, body: bytes, retry_after: str | None, now: float) -> ChannelError:
    """What a non-200 answer from the token endpoint means for the delivery. Pure."""
    if status == 429 or status >= 500 or status == 408:
        return RetryableError(
            f"SMART token endpoint HTTP {status}",
            retry_after=parse_retry_after(retry_after, now=now),
        )
    code = _oauth_error_code(body)
    if code:
        # invalid_client (key not registered, wrong kid, bad signature), invalid_scope,
        # unauthorized_client: an operator must fix the registration or the settings.
        return PermanentError(f"SMART token refused: {code}")
    return PermanentError(f"SMART token refused: HTTP {status}")


def _oauth_error_code(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, Mapping):
        return None
    code = data.get("error")
    if isinstance(code, str) and _OAUTH_ERROR.fullmatch(code):
        return code
    return None


def signing_key(pem: str, algorithm: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The private key from PEM text, checked against the algorithm. Pure."""
    try:
        key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError):
        raise PermanentError("smart.private_key is not an unencrypted PEM private key") from None
    if algorithm == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise PermanentError("smart.private_key is not an RSA key (algorithm RS384)")
        if key.key_size < 2048:
            raise PermanentError("smart.private_key: RSA keys need at least 2048 bits")
        return key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise PermanentError("smart.private_key is not a P-384 EC key (algorithm ES384)")
    return key


def client_assertion(settings: SmartSettings, pem: str, now: float, jti: str) -> str:
    """The signed JWT for one token request. Pure (``jti`` and ``now`` come in)."""
    key = signing_key(pem, settings.algorithm)
    headers: dict[str, Any] = {"typ": "JWT"}
    if settings.key_id:
        headers["kid"] = settings.key_id
    claims = assertion_claims(settings.client_id, settings.token_url, now, jti)
    return jwt.encode(claims, key, algorithm=settings.algorithm, headers=headers)


class SmartTokenClient:
    """One channel's access token: fetched when needed, shared by concurrent sends."""

    def __init__(
        self,
        settings: SmartSettings,
        http: httpx.AsyncClient,
        context: ChannelContext,
        *,
        new_jti: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.settings = settings
        self._http = http
        self._context = context
        self._new_jti = new_jti
        self._token: AccessToken | None = None
        self._lock = asyncio.Lock()
        self._fetches = 0

    @property
    def fetches(self) -> int:
        """Token requests made so far: a send that notes it first can tell whether the
        token it got was fetched for it (serial above the count) or came from the cache."""
        return self._fetches

    async def token(self) -> AccessToken:
        """A token usable now: the cached one, or a fresh one (one fetch at a time)."""
        token = self._token
        if token is not None and usable(token, self._context.clock()):
            return token
        async with self._lock:
            # Another send may have fetched one while this one waited for the lock.
            token = self._token
            if token is not None and usable(token, self._context.clock()):
                return token
            token = await self._fetch()
            self._token = token
            return token

    def drop(self, token: AccessToken) -> None:
        """Forget ``token`` (the FHIR server refused it), unless a newer one replaced it."""
        if self._token is token:
            self._token = None

    async def _fetch(self) -> AccessToken:
        now = self._context.clock()
        pem = self.settings.private_key.read(self._context.base_dir)
        form = {
            "grant_type": "client_credentials",
            "scope": self.settings.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": client_assertion(self.settings, pem, now, self._new_jti()),
        }
        try:
            response = await self._http.post(
                self.settings.token_url, data=form, headers={"Accept": "application/json"}
            )
        except (httpx.RequestError, httpx.InvalidURL) as exc:
            error = classify_exception(exc)
            reason = f"SMART token endpoint: {error.reason}"
            if isinstance(error, PermanentError):
                raise PermanentError(reason) from None
            raise RetryableError(reason) from None
        if response.status_code != 200:
            raise token_error(
                response.status_code,
                response.content,
                response.headers.get("Retry-After"),
                self._context.clock(),
            )
        self._fetches += 1
        return replace(token_from_response(response.content, obtained_at=now), serial=self._fetches)


__all__ = [
    "ASSERTION_LIFETIME",
    "CLIENT_ASSERTION_TYPE",
    "AccessToken",
    "SmartSettings",
    "SmartTokenClient",
    "assertion_claims",
    "client_assertion",
    "signing_key",
    "token_error",
    "token_from_response",
    "usable",
]
