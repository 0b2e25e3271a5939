"""The ``webhook`` channel: a signed HTTP POST of the rendered payload.

The body is the payload exactly as rendered (usually JSON), with the envelope's content
type, POSTed to ``url`` — or to the envelope's endpoint when the directory names an
http(s) URL. Headers the receiver can rely on:

``X-Refloop-Timestamp``
    unix seconds when this attempt was signed.
``X-Refloop-Signature``
    ``v1=<hex>``: HMAC-SHA256, keyed with the ``signing_secret``, over the bytes
    ``"<timestamp>." + body``. Receivers check it with :func:`verify_signature` (or the
    same four lines in their language) and refuse stale timestamps, which stops replays.
    A comma-separated list of ``v1=`` values is accepted so keys can be rotated.
``Idempotency-Key``
    the delivery's key, the same on every attempt: receivers deduplicate on it.
``X-Refloop-Delivery`` / ``X-Refloop-Attempt``
    the delivery id and the attempt number (1 on the first try).

Any 2xx is a receipt (``detail="HTTP 2xx"``); its ``Location`` header or a JSON ``id``
becomes the peer reference. A 2xx body that is not JSON is still a success: the peer
said it took the delivery, and resending would only duplicate it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import ClassVar

from pydantic import ValidationInfo, field_validator

from channels._http import (
    HttpChannel,
    TokenAuthSettings,
    auth_headers,
    checked_url,
    json_object,
    short_token,
)
from channels.base import (
    ChannelSettings,
    Envelope,
    PermanentError,
    Receipt,
    Secret,
)

TIMESTAMP_HEADER = "X-Refloop-Timestamp"
SIGNATURE_HEADER = "X-Refloop-Signature"
DELIVERY_HEADER = "X-Refloop-Delivery"
ATTEMPT_HEADER = "X-Refloop-Attempt"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_VERSION = "v1"


class WebhookSettings(TokenAuthSettings):
    # Where to POST when the envelope's endpoint is not an http(s) URL.
    url: str | None = None
    signing_secret: Secret

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else checked_url(value, info)


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>." + body``. Pure."""
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int | str, body: bytes) -> str:
    return f"{SIGNATURE_VERSION}={sign(secret, timestamp, body)}"


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    header: str,
    *,
    now: float,
    tolerance_seconds: float = 300,
) -> bool:
    """Whether ``header`` (an ``X-Refloop-Signature`` value) signs ``body`` at
    ``timestamp`` with ``secret``, and ``timestamp`` is within ``tolerance_seconds`` of
    ``now`` (either side: clocks drift). Pure; constant-time comparison."""
    timestamp = timestamp.strip()
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance_seconds:
        return False
    expected = sign(secret, timestamp, body)
    for item in header.split(","):
        version, _, value = item.strip().partition("=")
        if version == SIGNATURE_VERSION and hmac.compare_digest(value.strip(), expected):
            return True
    return False


def _is_url(endpoint: str) -> bool:
    return endpoint.lower().startswith(("https://", "http://"))


class WebhookChannel(HttpChannel[WebhookSettings]):
    Settings: ClassVar[type[ChannelSettings]] = WebhookSettings

    def _url(self, envelope: Envelope) -> str:
        if _is_url(envelope.endpoint):
            return envelope.endpoint
        if self.settings.url:
            return self.settings.url
        raise PermanentError("webhook has no URL: set url or give an http(s) endpoint")

    async def send(self, envelope: Envelope) -> Receipt:
        url = self._url(envelope)
        secret = self.settings.signing_secret.read(self.context.base_dir)
        timestamp = int(self.context.clock())
        headers = {
            "Content-Type": envelope.content_type,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: signature_header(secret, timestamp, envelope.payload),
            IDEMPOTENCY_HEADER: envelope.idempotency_key,
            DELIVERY_HEADER: str(envelope.delivery_id),
            ATTEMPT_HEADER: str(envelope.attempt),
            **auth_headers(self.settings, self.context.base_dir),
        }
        response = await self.http.request("POST", url, content=envelope.payload, headers=headers)
        reference = short_token(response.headers.get("Location", ""), limit=512)
        if not reference:
            body = json_object(response)
            reference = short_token(body.get("id")) if body else ""
        return Receipt(peer_reference=reference, detail=f"HTTP {response.status_code}")
