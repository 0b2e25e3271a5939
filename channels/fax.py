"""The ``fax`` channel: a PDF through an HTTP fax-gateway API.

Theory of operation
-------------------
``send`` POSTs ``multipart/form-data`` to ``url``: the PDF as the ``file`` part
(filename from the envelope's metadata, else ``referral.pdf``), ``to`` (the envelope's
endpoint, else ``to_number``; digits with an optional leading +), and ``from`` and
``cover`` when configured; with the auth header from ``token`` and ``Idempotency-Key``.
The gateway answers 2xx with ``{"id": ..., "status": ...}``.

A fax is not delivered when the gateway accepts it — it is queued for dialling, which
takes minutes. With ``status_url`` (a URL template holding ``{id}``) ``send`` polls every
``poll_seconds`` until the status is one of

* ``delivered_statuses`` → ``Receipt(confirmed=True, peer_reference=id)``;
* ``failed_statuses`` → :class:`RetryableError` (a busy line, no answer), or
  :class:`PermanentError` when the gateway's failure code (the ``failure_code_field`` of
  the status body) is in ``permanent_failure_codes`` (an invalid number, not a fax line);

or ``receipt_timeout_seconds`` have passed, which returns
``Receipt(confirmed=False, peer_reference=id, detail="fax queued at the gateway")``: the
gateway has the fax, and a resend could fax the PHI twice. A status poll that fails is
not a failed fax: transient poll errors are retried until the timeout, a permanent one
(401, 404) ends polling with the same unconfirmed receipt. Without ``status_url`` the
receipt is unconfirmed right after the 2xx; a later callback can confirm it —
:func:`parse_status_callback` and :func:`outcome` are the pure halves such an endpoint
needs.

The whole attempt — upload and polls — stays within ``timeout_seconds`` (the dispatcher
cancels an attempt that overruns it, and a cancelled attempt after a good upload would be
resent): each poll gets only what is left of it, and when it runs out the receipt is the
unconfirmed one. Hence ``receipt_timeout_seconds`` may not exceed ``timeout_seconds``, and
both default higher than for other channels. A fax that takes longer than a dispatcher
slot should be held for is better confirmed by the gateway's callback.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any, ClassVar
from urllib.parse import quote

from pydantic import Field, ValidationInfo, field_validator

from channels._http import (
    HttpChannel,
    TokenAuthSettings,
    auth_headers,
    checked_url,
    json_object,
    media_type,
    short_token,
)
from channels.base import (
    PDF,
    ChannelError,
    ChannelSettings,
    Envelope,
    PermanentError,
    Receipt,
    RetryableError,
)

DEFAULT_FILENAME = "referral.pdf"
QUEUED = "fax queued at the gateway"
_FAX_NUMBER = re.compile(r"\+?[0-9]{3,20}")
_SEPARATORS = str.maketrans("", "", " -().\u00a0")
_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._\- ]")
_STATUS = re.compile(r"[A-Za-z0-9_\-]{1,40}")


def fax_number(endpoint: str) -> str | None:
    """The endpoint as dialable digits (visual separators removed), or None. Pure."""
    compact = endpoint.strip().translate(_SEPARATORS)
    return compact if _FAX_NUMBER.fullmatch(compact) else None


def _statuses(value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s.strip().lower() for s in value if s.strip())


class FaxSettings(TokenAuthSettings):
    url: str
    status_url: str | None = None  # e.g. "https://gw.example/v1/faxes/{id}"
    # Where to fax when the envelope names no number (a clinic's referral intake line).
    to_number: str | None = None
    from_number: str | None = None  # sent as the ``from`` field
    cover: str | None = None  # sent as the ``cover`` field (a cover-sheet name or text)
    # The whole attempt, polling included (see the module docstring).
    timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    poll_seconds: float = Field(default=15.0, gt=0, le=3600)
    receipt_timeout_seconds: float = Field(default=90.0, ge=0, le=3600)
    delivered_statuses: tuple[str, ...] = ("delivered", "success", "completed")
    failed_statuses: tuple[str, ...] = ("failed", "error")
    permanent_failure_codes: tuple[str, ...] = ()
    failure_code_field: str = "error_code"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        return checked_url(value, info)

    @field_validator("to_number")
    @classmethod
    def _to(cls, value: str | None) -> str | None:
        if value is not None and fax_number(value) is None:
            raise ValueError("not a fax number (digits, optional leading +)")
        return value

    @field_validator("status_url")
    @classmethod
    def _status_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if "{id}" not in value:
            raise ValueError("must hold {id} where the gateway's fax id goes")
        checked_url(value.replace("{id}", "id"), info)
        return value

    @field_validator("receipt_timeout_seconds")
    @classmethod
    def _within_attempt(cls, value: float, info: ValidationInfo) -> float:
        attempt = info.data.get("timeout_seconds")
        if attempt is not None and value > attempt:
            raise ValueError("must not exceed timeout_seconds (the whole attempt, polls included)")
        return value

    @field_validator("delivered_statuses", "failed_statuses")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _statuses(value)

    @field_validator("permanent_failure_codes")
    @classmethod
    def _codes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(c.strip().casefold() for c in value if c.strip())


def parse_status_callback(body: Mapping[str, Any]) -> tuple[str, str]:
    """``(fax id, status)`` from a gateway's status body (a poll answer or a callback);
    the status lower-cased. :class:`ValueError` when either is missing or not a token.
    Pure."""
    fax_id = short_token(body.get("id"))
    status = short_token(body.get("status"), limit=40)
    if not fax_id:
        raise ValueError("status body has no fax id")
    if not _STATUS.fullmatch(status):
        raise ValueError("status body has no status")
    return fax_id, status.lower()


def failure_code(body: Mapping[str, Any], field: str) -> str:
    """The gateway's failure code as a short token, or "". Pure."""
    code = short_token(body.get(field), limit=40)
    return code if _STATUS.fullmatch(code) else ""


def outcome(
    settings: FaxSettings, fax_id: str, status: str, code: str = ""
) -> Receipt | ChannelError | None:
    """What a gateway status means: a confirmed receipt, the error to raise, or None while
    the fax is still pending. Pure."""
    status = status.lower()
    if status in settings.delivered_statuses:
        return Receipt(peer_reference=fax_id, detail=f"fax {status}", confirmed=True)
    if status in settings.failed_statuses:
        reason = f"fax {status} at the gateway" + (f", code {code}" if code else "")
        if code and code.casefold() in settings.permanent_failure_codes:
            return PermanentError(reason)
        return RetryableError(reason)
    return None


def _body_outcome(
    settings: FaxSettings, fax_id: str, body: Mapping[str, Any] | None
) -> Receipt | ChannelError | None:
    if body is None:
        return None
    try:
        _, status = parse_status_callback({**body, "id": fax_id})
    except ValueError:
        return None  # no readable status yet: keep waiting
    return outcome(settings, fax_id, status, failure_code(body, settings.failure_code_field))


def filename(metadata: Mapping[str, str]) -> str:
    """A plain file name for the ``file`` part: no folders, no quotes or controls."""
    name = PurePosixPath(metadata.get("filename", "").replace("\\", "/")).name
    name = _SAFE_FILENAME.sub("_", name).strip(" .")
    return name[:100] or DEFAULT_FILENAME


class FaxChannel(HttpChannel[FaxSettings]):
    Settings: ClassVar[type[ChannelSettings]] = FaxSettings

    async def send(self, envelope: Envelope) -> Receipt:
        if media_type(envelope.content_type) != PDF:
            raise PermanentError("fax needs application/pdf")
        number = envelope.endpoint or self.settings.to_number
        if not number:
            raise PermanentError("fax needs a fax number (no endpoint, no to_number)")
        to = fax_number(number)
        if to is None:
            raise PermanentError("fax endpoint is not a fax number (digits, optional +)")
        form = {"to": to}
        if self.settings.from_number:
            form["from"] = self.settings.from_number
        if self.settings.cover:
            form["cover"] = self.settings.cover
        auth = auth_headers(self.settings, self.context.base_dir)
        attempt_ends = asyncio.get_running_loop().time() + self.settings.timeout_seconds
        response = await self.http.request(
            "POST",
            self.settings.url,
            data=form,
            files={"file": (filename(envelope.metadata), envelope.payload, PDF)},
            headers={"Idempotency-Key": envelope.idempotency_key, **auth},
        )
        body = json_object(response)
        fax_id = short_token(body.get("id")) if body else ""
        if not fax_id:
            # Without an id the fax cannot be tracked, and a 2xx without one is not what a
            # gateway says when it queued a fax (a proxy's page, a half-upgraded API).
            # Retrying is the safer error: the Idempotency-Key lets a gateway that did
            # queue it answer with the same fax instead of sending it again.
            raise RetryableError(
                f"HTTP {response.status_code} from the fax gateway without a fax id"
            )
        return await self._track(fax_id, body, auth, attempt_ends)

    async def _track(
        self,
        fax_id: str,
        body: Mapping[str, Any] | None,
        auth: Mapping[str, str],
        attempt_ends: float,
    ) -> Receipt:
        status_url = self.settings.status_url
        loop = asyncio.get_running_loop()
        deadline = min(loop.time() + self.settings.receipt_timeout_seconds, attempt_ends)
        while True:
            result = _body_outcome(self.settings, fax_id, body)
            if isinstance(result, ChannelError):
                raise result
            if result is not None:
                return result
            remaining = deadline - loop.time()
            if status_url is None or remaining <= 0:
                return Receipt(peer_reference=fax_id, detail=QUEUED, confirmed=False)
            await asyncio.sleep(min(self.settings.poll_seconds, remaining))
            url = status_url.replace("{id}", quote(fax_id, safe=""))
            try:
                response = await self.http.request(
                    "GET", url, headers=dict(auth), within=attempt_ends - loop.time()
                )
            except RetryableError:
                body = None  # the poll failed, not the fax: ask again next time
                continue
            except PermanentError as exc:
                detail = f"{QUEUED}; status poll {exc.reason}"
                return Receipt(peer_reference=fax_id, detail=detail, confirmed=False)
            body = json_object(response)
