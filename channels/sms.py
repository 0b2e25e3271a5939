"""The ``sms`` channel: a text message through a Twilio-compatible Messages API.

``POST {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json``, form-encoded
``To`` (the envelope's endpoint, else ``to_number``; E.164), ``From``
(``from_number``), ``Body`` (the payload, which must be ``text/plain`` UTF-8) and, when
set, ``StatusCallback``; HTTP Basic auth with the account SID and the auth token.
Twilio and the gateways that copy its API (SignalWire's compatibility API, a clinic's
own relay) answer 201 with ``{"sid": ..., "status": "queued"}``.

The receipt is unconfirmed unless the gateway already says ``sent``/``delivered``: a
queued message has only reached the gateway; its ``StatusCallback`` confirms later. A
2xx without a readable ``sid`` is still a receipt: the gateway took the message and
Twilio ignores ``Idempotency-Key`` (sent anyway, for gateways that honour it), so a
retry would text the patient twice.

Bodies longer than ``max_segments`` concatenated segments (153 GSM-7 characters each)
are refused before sending: a referral notice that long is a rendering mistake, and
gateways bill (and phones show) every segment. Twilio errors carry a numeric ``code``
(21211 invalid To, 21610 unsubscribed recipient); the reason names it, never Twilio's
``message``, which quotes the number.
"""

from __future__ import annotations

import re
from typing import ClassVar
from urllib.parse import quote

import httpx
from pydantic import Field, ValidationInfo, field_validator

from channels._http import (
    HttpChannel,
    HttpSettings,
    checked_url,
    json_object,
    media_type,
    short_token,
)
from channels.base import (
    TEXT,
    ChannelContext,
    ChannelSettings,
    Envelope,
    PermanentError,
    Receipt,
    Secret,
)

#: Characters of one part of a concatenated GSM-7 SMS (160 minus the 7-byte UDH).
SEGMENT_CHARS = 153
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
# Separators people type into phone numbers; removing them changes no digit.
_SEPARATORS = str.maketrans("", "", " -().\u00a0")
_STATUS = re.compile(r"[a-z_\-]{1,32}")  # Twilio's vocabulary: queued, accepted, sent, ...
_CONFIRMED_STATUSES = frozenset({"sent", "delivered"})


def e164(number: str) -> str | None:
    """``number`` as E.164 (``+15551234567``) with visual separators removed, or None."""
    compact = number.strip().translate(_SEPARATORS)
    return compact if _E164.fullmatch(compact) else None


class SmsSettings(HttpSettings):
    base_url: str = "https://api.twilio.com"
    account_sid: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    auth_token: Secret
    from_number: str
    # Whom to text when the envelope names nobody (a clinic's referral coordinator).
    to_number: str | None = None
    status_callback: str | None = None
    max_segments: int = Field(default=10, ge=1, le=100)

    @field_validator("base_url", "status_callback")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else checked_url(value, info)

    @field_validator("from_number", "to_number")
    @classmethod
    def _number(cls, value: str | None) -> str | None:
        if value is None:
            return None
        number = e164(value)
        if number is None:
            raise ValueError("not an E.164 number (+ country code and up to 15 digits)")
        return number


def sms_body(envelope: Envelope, max_segments: int) -> str:
    """The text to send, or :class:`PermanentError` when the payload cannot be an SMS. Pure."""
    if media_type(envelope.content_type) != TEXT:
        raise PermanentError("sms needs text/plain")
    try:
        text = envelope.payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PermanentError("sms body is not UTF-8") from None
    if not text.strip():
        raise PermanentError("sms body is empty")
    if len(text) > max_segments * SEGMENT_CHARS:
        segments = -(-len(text) // SEGMENT_CHARS)
        raise PermanentError(f"sms body too long: {segments} segments, max_segments {max_segments}")
    return text


class SmsChannel(HttpChannel[SmsSettings]):
    Settings: ClassVar[type[ChannelSettings]] = SmsSettings

    def __init__(self, name: str, settings: SmsSettings, context: ChannelContext) -> None:
        super().__init__(name, settings, context)
        sid = quote(settings.account_sid, safe="")
        self.url = f"{settings.base_url.rstrip('/')}/2010-04-01/Accounts/{sid}/Messages.json"

    async def send(self, envelope: Envelope) -> Receipt:
        number = envelope.endpoint or self.settings.to_number
        if not number:
            raise PermanentError("sms needs a phone number (no endpoint, no to_number)")
        to = e164(number)
        if to is None:
            raise PermanentError("sms endpoint is not an E.164 number")
        form = {"To": to, "From": self.settings.from_number}
        form["Body"] = sms_body(envelope, self.settings.max_segments)
        if self.settings.status_callback:
            form["StatusCallback"] = self.settings.status_callback
        token = self.settings.auth_token.read(self.context.base_dir)
        response = await self.http.request(
            "POST",
            self.url,
            data=form,
            auth=httpx.BasicAuth(self.settings.account_sid, token),
            headers={"Idempotency-Key": envelope.idempotency_key},
        )
        body = json_object(response) or {}
        sid = short_token(body.get("sid"))
        status = short_token(body.get("status"), limit=32).lower()
        status = status if _STATUS.fullmatch(status) else ""
        detail = f"HTTP {response.status_code}"
        detail += f" {status}" if status else ""
        detail += "" if sid else ", no sid"
        return Receipt(peer_reference=sid, detail=detail, confirmed=status in _CONFIRMED_STATUSES)
