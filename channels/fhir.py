"""The ``fhir`` channel: FHIR R4 RESTful writes (create, update, transaction, batch).

Theory of operation
-------------------
The payload is a FHIR JSON resource the renderer has built and validated; the channel
sends its bytes unchanged. Where they go is decided by :func:`plan` (pure):

* the envelope's metadata wins: ``fhir_method`` (POST | PUT) and ``fhir_url`` (relative
  to the base: ``Task/abc``, ``ServiceRequest``, ``Task?identifier=...``), with the
  ``if_none_exist`` (conditional create) and ``if_match`` (version-aware update) headers;
* otherwise a Bundle of type transaction or batch is POSTed to the base, any other
  resource is POSTed to ``{base}/{resourceType}`` without an id or PUT to
  ``{base}/{resourceType}/{id}`` with one.

Every request carries the delivery's idempotency key as ``X-Request-Id`` (FHIR's
request id, which servers log and echo) and as ``Idempotency-Key``, and asks for
``Prefer: return=minimal``: the id we need is in ``Location`` (or, for an update,
the URL and ``ETag``), and a body that echoes the resource is PHI we would not read.
A POST is not idempotent by itself on most servers; a renderer that must never create
twice sets ``if_none_exist`` so a retry after a lost answer finds the first copy.

What the answer means is decided by :func:`outcome` (pure):

* 2xx → a :class:`Receipt` (``peer_reference`` = ``Type/id/_history/v``); for a
  transaction or batch, every entry's ``response.status`` must be 2xx too, and the
  receipt lists the entries' locations;
* 412 on an ``If-Match`` update → retryable: someone updated the resource since we read
  its version. The dispatcher retries later; a renderer that re-reads the version
  (re-rendering the payload) then wins, one that sends the same stale ETag keeps getting
  412 until the retry budget dead-letters it. A 412 without If-Match (a conditional
  create whose search matched several resources) cannot get better: permanent;
* 409, 408, 425, 429, 5xx, timeouts, refused connections → retryable (``Retry-After``
  honoured); other 4xx and 3xx (redirects are never followed) → permanent;
* 400/422 with an OperationOutcome → permanent, naming the issue codes and the
  expression/location paths only: ``diagnostics`` is the server's free text and may
  quote the resource;
* 401 with SMART auth: the cached token is dropped and the attempt is retryable, once —
  a token fetched during this very attempt that is still refused is permanent (the
  client's registration or scopes are wrong). 401/403 otherwise → permanent.

Auth is ``none``, a static ``bearer`` token (a :class:`Secret`, read per attempt so a
rotated token is picked up) or SMART Backend Services (:mod:`channels.smart`).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field, ValidationInfo, field_validator

from channels._common import CaFileError
from channels._http import (
    RETRYABLE_4XX,
    HttpSettings,
    async_client,
    checked_url,
    classify_exception,
    httpx_verify,
    media_type,
    parse_retry_after,
    url_problem,
)
from channels.base import (
    FHIR_JSON,
    JSON,
    ChannelConfigError,
    ChannelContext,
    ChannelError,
    ChannelSettings,
    Envelope,
    PermanentError,
    Receipt,
    RetryableError,
    Secret,
)
from channels.smart import AccessToken, SmartSettings, SmartTokenClient

BUNDLE_POSTS = ("transaction", "batch")
MAX_ISSUES_SHOWN = 5

_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# Type/id[/_history/vid] at the end of a Location.
_REFERENCE = re.compile(
    r"[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)
_ETAG_VERSION = re.compile(r'(?:W/)?"([A-Za-z0-9\-.]{1,64})"')
# OperationOutcome.issue.code is from a required value set (IssueType): lower-case words.
_ISSUE_CODE = re.compile(r"[a-z][a-z\-]{0,39}")
# An element path such as Task.input[0].value or /f:Task/f:status; no quotes, spaces or
# "=", so a FHIRPath filter that could carry a value (where(name='...')) is never shown.
_PATH = re.compile(r"[A-Za-z0-9_.:/\[\]\-]{1,120}")
_AUTH_ERROR = re.compile(r'error="([a-z_]{1,40})"')
# The settings key each auth mode needs, with how to write it.
_AUTH_KEYS = {
    "token": ("bearer", 'token = {env = "..."}'),
    "smart": ("smart", "[channels.<name>.smart] table"),
}


class FhirSettings(HttpSettings):
    """``[channels.<name>]`` with ``type = "fhir"``."""

    # The server's FHIR base, e.g. https://ehr.example.org/fhir (no trailing slash needed).
    base_url: str
    # false turns TLS certificate checks off: only for a test server, never for PHI.
    verify: bool = True
    auth: Literal["none", "bearer", "smart"] = "none"
    token: Secret | None = Field(default=None, validate_default=True)
    smart: SmartSettings | None = Field(default=None, validate_default=True)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str, info: ValidationInfo) -> str:
        return checked_url(value, info).rstrip("/")

    @field_validator("verify")
    @classmethod
    def _verify(cls, value: bool, info: ValidationInfo) -> bool:
        if not value and info.data.get("ca_file") is not None:
            raise ValueError("ca_file is set but verify = false ignores it")
        return value

    @field_validator("token", "smart")
    @classmethod
    def _set_for_its_auth(
        cls, value: Secret | SmartSettings | None, info: ValidationInfo
    ) -> Secret | SmartSettings | None:
        # Each of these keys is required by exactly one auth mode and refused by the others.
        mode, example = _AUTH_KEYS[str(info.field_name)]
        auth = info.data.get("auth")
        if auth == mode and value is None:
            raise ValueError(f'required when auth = "{mode}" ({example})')
        if auth != mode and value is not None:
            raise ValueError(f'only used with auth = "{mode}"')
        return value


@dataclass(frozen=True, slots=True)
class FhirRequest:
    """One RESTful interaction, relative to the base."""

    method: Literal["POST", "PUT"]
    path: str  # "" (a transaction/batch to the base), "Task", "Task/abc", "Task?identifier=x"
    bundle_type: str | None = None  # "transaction" | "batch" when posting one to the base
    if_none_exist: str | None = None
    if_match: str | None = None


def parse_payload(payload: bytes) -> Mapping[str, Any]:
    """The payload as a FHIR JSON resource, or a :class:`PermanentError`. Pure."""
    try:
        resource = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise PermanentError("payload is not valid JSON") from None
    if not isinstance(resource, dict):
        raise PermanentError("payload is not a JSON object (a FHIR resource)")
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not _RESOURCE_TYPE.fullmatch(rtype):
        raise PermanentError("payload has no valid resourceType")
    return resource


def plan(resource: Mapping[str, Any], metadata: Mapping[str, str]) -> FhirRequest:
    """How to send ``resource`` (see the module docstring). Pure."""
    rtype = str(resource["resourceType"])
    rid = resource.get("id")
    bundle_type = resource.get("type") if rtype == "Bundle" else None
    posts_to_base = bundle_type in BUNDLE_POSTS

    method_meta = metadata.get("fhir_method", "").strip().upper()
    if method_meta not in ("", "POST", "PUT"):
        raise PermanentError("metadata fhir_method must be POST or PUT")
    url_meta = _relative_url(metadata.get("fhir_url", ""))

    if url_meta is not None:
        path = url_meta
        # Type/id is an update; a type (or the base) is a create or a bundle.
        implied = "PUT" if "?" not in path and path.count("/") == 1 else "POST"
        method = method_meta or implied
    else:
        if method_meta:
            method = method_meta
        elif posts_to_base or not rid:
            method = "POST"
        else:
            method = "PUT"
        if posts_to_base and method == "POST":
            path = ""
        elif method == "POST":
            path = rtype
        else:
            if not isinstance(rid, str) or not _ID.fullmatch(rid):
                raise PermanentError("PUT needs the resource's id (or metadata fhir_url)")
            path = f"{rtype}/{rid}"

    if_none_exist = _header_value(metadata, "if_none_exist")
    if if_none_exist is not None:
        if method != "POST":
            raise PermanentError("metadata if_none_exist applies to a POST (create) only")
        # The header holds search parameters only; tolerate a "Type?" prefix.
        if_none_exist = if_none_exist.split("?", 1)[1] if "?" in if_none_exist else if_none_exist
    if_match = _header_value(metadata, "if_match")
    if if_match is not None:
        if method != "PUT":
            raise PermanentError("metadata if_match applies to a PUT (update) only")
        if if_match.isdigit():  # a bare versionId: FHIR ETags are weak
            if_match = f'W/"{if_match}"'
    return FhirRequest(
        method="PUT" if method == "PUT" else "POST",
        path=path,
        bundle_type=str(bundle_type) if posts_to_base and path == "" else None,
        if_none_exist=if_none_exist,
        if_match=if_match,
    )


def _relative_url(value: str) -> str | None:
    value = value.strip()
    if not value:
        return None
    if "://" in value or not value.isprintable() or " " in value:
        raise PermanentError("metadata fhir_url must be relative to the FHIR base")
    path = value.lstrip("/")
    if any(part in (".", "..") for part in path.split("?", 1)[0].split("/")):
        raise PermanentError("metadata fhir_url must stay under the FHIR base")
    return path


def _header_value(metadata: Mapping[str, str], key: str) -> str | None:
    value = metadata.get(key, "").strip()
    if not value:
        return None
    if not value.isprintable():
        raise PermanentError(f"metadata {key} holds control characters")
    return value


def request_headers(request: FhirRequest, idempotency_key: str) -> dict[str, str]:
    """The headers of one attempt (auth is added by the shell). Pure."""
    headers = {
        "Content-Type": FHIR_JSON,
        "Accept": FHIR_JSON,
        "Prefer": "return=minimal",
        "X-Request-Id": idempotency_key,
        "Idempotency-Key": idempotency_key,
    }
    if request.if_none_exist:
        headers["If-None-Exist"] = request.if_none_exist
    if request.if_match:
        headers["If-Match"] = request.if_match
    return headers


def join_url(base: str, path: str) -> str:
    return f"{base.rstrip('/')}/{path}" if path else base.rstrip("/")


def outcome(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    request: FhirRequest,
    *,
    now: float,
) -> Receipt | ChannelError:
    """What the server's answer means (see the module docstring). Pure."""
    if 200 <= status < 300:
        if request.bundle_type:
            return _bundle_outcome(status, body, request.bundle_type)
        return Receipt(
            peer_reference=_peer_reference(headers, request),
            detail=f"HTTP {status}",
            confirmed=status != 202,  # 202: queued for asynchronous processing
        )
    reason = f"HTTP {status}"
    issues = issues_summary(_json(body))
    if issues:
        reason += f" OperationOutcome: {issues}"
    return _status_error(status, reason, request, headers.get("Retry-After"), now)


def _status_error(
    status: int,
    reason: str,
    request: FhirRequest | None,
    retry_after: str | None,
    now: float,
) -> ChannelError:
    if 300 <= status < 400:
        return PermanentError(f"{reason} redirect not followed (configure the final base_url)")
    if status == 412 and (request is None or request.if_match):
        return RetryableError(f"{reason} (If-Match: the resource changed since it was read)")
    if status == 409 or status in RETRYABLE_4XX or status >= 500:
        return RetryableError(reason, retry_after=parse_retry_after(retry_after, now=now))
    return PermanentError(reason)


def _bundle_outcome(status: int, body: bytes, bundle_type: str) -> Receipt | ChannelError:
    bundle = _json(body)
    expected = f"{bundle_type}-response"
    if not isinstance(bundle, Mapping) or bundle.get("type") != expected:
        # A 2xx without the response Bundle: the server took it (a transaction is atomic),
        # but its entries cannot be checked or referenced.
        return Receipt(detail=f"HTTP {status} (no {expected} Bundle)")
    entries = bundle.get("entry")
    entries = entries if isinstance(entries, list) else []
    locations: list[str] = []
    failures: list[tuple[int, int, str]] = []
    for index, entry in enumerate(entries):
        response = entry.get("response") if isinstance(entry, Mapping) else None
        if not isinstance(response, Mapping):
            continue
        code = _status_code(response.get("status"))
        if code is None:
            continue
        if 200 <= code < 300:
            location = response.get("location")
            reference = relative_reference(location) if isinstance(location, str) else ""
            if reference:
                locations.append(reference)
            continue
        failures.append((index, code, issues_summary(response.get("outcome"))))
    if failures:
        shown = "; ".join(
            f"entry {i} HTTP {code}" + (f" ({issues})" if issues else "")
            for i, code, issues in failures[:MAX_ISSUES_SHOWN]
        )
        more = len(failures) - MAX_ISSUES_SHOWN
        reason = f"{bundle_type} failed: {shown}" + (f"; +{more} more" if more > 0 else "")
        # Entries are judged as the same request would be on its own; one that can never
        # succeed makes the whole delivery permanent (re-sending would repeat the others).
        errors = [_status_error(code, reason, None, None, 0.0) for _, code, _ in failures]
        if any(not e.retryable for e in errors):
            return PermanentError(reason)
        return RetryableError(reason)
    return Receipt(
        peer_reference=" ".join(locations),
        detail=f"HTTP {status} {expected}, {len(entries)} entries",
    )


def _status_code(value: Any) -> int | None:
    # "201 Created", "201", or (rarely) a number.
    text = str(value).strip() if isinstance(value, str | int) else ""
    head = text[:3]
    return int(head) if head.isdigit() and len(head) == 3 else None


def issues_summary(data: Any) -> str:
    """``code at path, path; code ...`` of an OperationOutcome's issues (errors first).
    Never ``diagnostics`` or ``details.text``: a server's free text may quote the
    resource. Pure; "" when ``data`` is not an OperationOutcome."""
    if not isinstance(data, Mapping) or data.get("resourceType") != "OperationOutcome":
        return ""
    issues = [i for i in data.get("issue") or [] if isinstance(i, Mapping)]
    errors = [i for i in issues if i.get("severity") in ("error", "fatal")]
    parts = []
    for item in (errors or issues)[:MAX_ISSUES_SHOWN]:
        code = item.get("code")
        text = code if isinstance(code, str) and _ISSUE_CODE.fullmatch(code) else "issue"
        paths = [
            p
            for key in ("expression", "location")
            for p in (item.get(key) or [])
            if isinstance(p, str) and _PATH.fullmatch(p)
        ]
        if paths:
            text += " at " + ", ".join(dict.fromkeys(paths))
        parts.append(text)
    more = len(errors or issues) - MAX_ISSUES_SHOWN
    if more > 0:
        parts.append(f"+{more} more")
    return "; ".join(parts)


def relative_reference(location: str) -> str:
    """``Type/id/_history/v`` from an absolute or relative Location; "" when it names
    no resource (a job queue URL, say). Pure."""
    found = _REFERENCE.search(location.split("?", 1)[0].rstrip("/"))
    return found.group(0) if found else ""


def _peer_reference(headers: Mapping[str, str], request: FhirRequest) -> str:
    location = headers.get("Location") or headers.get("Content-Location")
    if location:
        reference = relative_reference(location)
        if reference:
            return reference
    if request.method == "PUT" and "?" not in request.path and request.path.count("/") == 1:
        # R4 does not require Location on update; the URL and ETag say the same.
        found = _ETAG_VERSION.fullmatch(headers.get("ETag", "").strip())
        return f"{request.path}/_history/{found.group(1)}" if found else request.path
    return ""


def _json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _refused(token: AccessToken, fetches_before: int, challenge: str) -> ChannelError:
    """A 401 to a SMART token the shell has just dropped; ``fetches_before`` is the token
    client's fetch count when the attempt began. Pure."""
    found = _AUTH_ERROR.search(challenge)
    reason = "HTTP 401" + (f" {found.group(1)}" if found else "")
    if token.serial <= fetches_before:
        # Cached from an earlier attempt: revoked, or expired earlier than it said. The
        # next attempt asks for a new one.
        return RetryableError(f"{reason}: SMART access token refused, dropped")
    return PermanentError(f"{reason}: a freshly issued SMART access token was refused")


class FhirChannel:
    """Sends FHIR JSON payloads to one FHIR R4 server."""

    Settings: ClassVar[type[ChannelSettings]] = FhirSettings

    def __init__(self, name: str, settings: FhirSettings, context: ChannelContext) -> None:
        self.name = name
        self.settings = settings
        self._context = context
        self._http = async_client(settings.timeout_seconds, self._tls())
        self._smart = (
            SmartTokenClient(settings.smart, self._http, context)
            if settings.auth == "smart" and settings.smart is not None
            else None
        )

    def _tls(self) -> ssl.SSLContext | bool:
        if not self.settings.verify:
            return False
        try:
            return httpx_verify(self.settings.ca_file, self._context.base_dir)
        except CaFileError as exc:
            kind = type(exc.cause).__name__
            raise ChannelConfigError([f"ca_file: {exc.path} unusable ({kind})"]) from None

    def _base(self, envelope: Envelope) -> str:
        if not envelope.endpoint:
            return self.settings.base_url
        # The directory names this specialist's own FHIR base.
        problem = url_problem(envelope.endpoint, allow_plain_http=self.settings.allow_plain_http)
        if problem:
            raise PermanentError(f"endpoint refused: {problem}")
        return envelope.endpoint.rstrip("/")

    async def send(self, envelope: Envelope) -> Receipt:
        fetches_before = self._smart.fetches if self._smart is not None else 0
        if media_type(envelope.content_type) not in (FHIR_JSON, JSON):
            raise PermanentError(f"content type {envelope.content_type} is not FHIR JSON")
        request = plan(parse_payload(envelope.payload), envelope.metadata)
        base = self._base(envelope)
        headers = request_headers(request, envelope.idempotency_key)
        token: AccessToken | None = None
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                if self._smart is not None:
                    token = await self._smart.token()
                    headers["Authorization"] = f"Bearer {token.value}"
                elif self.settings.token is not None:
                    bearer = self.settings.token.read(self._context.base_dir)
                    headers["Authorization"] = f"Bearer {bearer}"
                response = await self._http.request(
                    request.method,
                    join_url(base, request.path),
                    content=envelope.payload,
                    headers=headers,
                )
        except (httpx.RequestError, httpx.InvalidURL, TimeoutError) as exc:
            raise classify_exception(exc) from None
        if response.status_code == 401 and self._smart is not None and token is not None:
            self._smart.drop(token)
            raise _refused(token, fetches_before, response.headers.get("WWW-Authenticate", ""))
        result = outcome(
            response.status_code,
            response.headers,
            response.content,
            request,
            now=self._context.clock(),
        )
        if isinstance(result, ChannelError):
            raise result
        return result

    async def aclose(self) -> None:
        await self._http.aclose()


__all__ = [
    "FhirChannel",
    "FhirRequest",
    "FhirSettings",
    "issues_summary",
    "join_url",
    "outcome",
    "parse_payload",
    "plan",
    "relative_reference",
    "request_headers",
]
