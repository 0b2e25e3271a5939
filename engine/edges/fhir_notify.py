"""The FHIR notification endpoints: where sources' servers tell us what changed.

Theory of operation
-------------------
``POST /fhir/r4/_notify/{source}`` takes R4 Backport notification Bundles and R4 core
rest-hook POSTs (a resource, or an empty ping); ``PUT|POST
/fhir/r4/_notify/{source}/{type}/{id}`` takes the update-style R4 rest-hook (the
resource, or nothing: then it is read back). Each request, in this order:

1. **who** — the body is read (up to the source's ``max_body_bytes``: 413 beyond) and
   checked against the source's bearer token or HMAC signature
   (:class:`engine.edges.fhir_auth.FhirAuth`) before anything parses it; every failure
   is the same 401, an address outside the source's CIDRs 403;
2. **what** — JSON (400 when broken), then :func:`engine.protocol.fhir_notify.classify`
   (400 when it is no notification);
3. **promised work first** — :meth:`SubscriptionManager.prepare` writes the read-backs
   and reconciliation searches the notification needs, and finds gaps in its event
   numbers, so a crash after the answer still does them;
4. **stored** — an event notification's Bundle as its own ``FHIR:Bundle`` row (the
   announcement, which the mappings ignore: a trace of what was announced even when
   the focus resources only come later), then every resource it carries through
   :func:`engine.services.fhir_intake.accept_resources` (422 with its OperationOutcome
   when one is invalid; 503 when the database cannot commit, so the server retries);
5. **answered** — 200 as soon as that is durable; the event number and the time are
   recorded (:meth:`SubscriptionManager.commit`) and the follow-ups run after the
   answer (athenahealth allows a few seconds, and a read-back may take longer).

Handshakes and heartbeats store no rows: they only say the subscription is alive.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.config import Config, FhirSourceConfig
from engine.edges.fhir_auth import FhirAuth, forbidden, unauthorized
from engine.edges.http_app import read_body
from engine.logs import get_logger
from engine.metrics import FHIR_RESOURCE_LABELS, Metrics
from engine.protocol.fhir import (
    FHIR_JSON,
    JSON_MEDIA_TYPES,
    FhirJsonError,
    Issue,
    compact,
    error,
    operation_outcome,
    parse_json,
)
from engine.protocol.fhir_notify import KEY_HEADER, Notification, NotificationError, classify
from engine.services.fhir_intake import FhirRejected, accept_resources
from engine.services.fhir_intake import prepare as intake_row
from engine.services.fhir_intake import store as intake_store
from engine.services.subscriptions import Prepared, SubscriptionManager
from engine.services.writer import GroupCommitWriter, StorageUnavailable

log = get_logger("refloop.fhir.notify")

NOTIFY_PATH = "/fhir/r4/_notify/{source}"
RETRY_AFTER_SECONDS = "5"
_KEY = re.compile(r"[A-Za-z0-9:_\-.]{1,80}")


@dataclass(frozen=True)
class NotifyContext:
    """What the notification routes need from the daemon."""

    config: Config
    writer: GroupCommitWriter
    metrics: Metrics
    manager: SubscriptionManager
    # Built from the config when not given; the REST API's instance can be shared.
    auth: FhirAuth | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


def notify_routes(context: NotifyContext) -> list[Route]:
    """``POST /fhir/r4/_notify/{source}`` and ``PUT|POST …/{source}/{type}/{id}``."""
    handler = _Handler(context)
    return [
        Route(NOTIFY_PATH, handler.handle, methods=["POST"]),
        Route(NOTIFY_PATH + "/{type}/{id}", handler.handle, methods=["PUT", "POST"]),
    ]


def _outcome(
    status: int, issues: list[Issue], headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(
        operation_outcome(issues), status_code=status, media_type=FHIR_JSON, headers=headers
    )


def _label(note: Notification | None, path_type: str | None) -> str:
    if note is not None and note.style != "rest-hook":
        return "Bundle"
    rtype = path_type
    if note is not None and note.resources:
        rtype = str(note.resources[0].get("resourceType"))
    return rtype if rtype in FHIR_RESOURCE_LABELS else "other"


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class _Handler:
    def __init__(self, context: NotifyContext) -> None:
        self.context = context
        self.config = context.config
        self.auth = context.auth or FhirAuth.from_config(context.config)

    def _count(self, source: str, resource: str, outcome: str) -> None:
        self.context.metrics.fhir_requests.labels(source, resource, outcome).inc()

    async def handle(self, request: Request) -> Response:
        path_type = request.path_params.get("type")
        path_id = request.path_params.get("id")
        label = _label(None, path_type)
        source = self.auth.source_for(request.path_params["source"])
        client = request.client
        client_ip = client.host if client else ""
        peer = f"{client.host}:{client.port}" if client else "unknown"
        if source is None:
            self._count("unknown", label, "unauthorized")
            return unauthorized()
        body = await read_body(request, source.max_body_bytes)
        if body is None:
            self._count(source.name, label, "too_large")
            return _outcome(
                413,
                [error("too-costly", f"the body is larger than {source.max_body_bytes} bytes")],
            )
        verdict = self.auth.check(source, request.headers, body, client_ip)
        if verdict != "ok":
            self._count("unknown" if verdict == "unauthorized" else source.name, label, verdict)
            return unauthorized() if verdict == "unauthorized" else forbidden()
        return await self._authenticated(request, source, body, peer, path_type, path_id)

    async def _authenticated(
        self,
        request: Request,
        source: FhirSourceConfig,
        body: bytes,
        peer: str,
        path_type: str | None,
        path_id: str | None,
    ) -> Response:
        label = _label(None, path_type)
        parsed: Any = None
        if body.strip():
            if _media_type(request) not in JSON_MEDIA_TYPES:
                self._count(source.name, label, "unsupported")
                return _outcome(
                    415,
                    [error("not-supported", "send notifications as application/fhir+json")],
                )
            try:
                parsed = parse_json(body)
            except FhirJsonError as exc:
                self._count(source.name, label, "invalid")
                return _outcome(400, [exc.issue])
        try:
            note = classify(parsed, path_type=path_type, path_id=path_id)
        except NotificationError as exc:
            self._count(source.name, label, "invalid")
            return _outcome(400, [error("invalid", exc.reason, exc.expression)])
        label = _label(note, path_type)
        key = request.headers.get(KEY_HEADER)
        key = key if key and _KEY.fullmatch(key) else None
        manager = self.context.manager
        try:
            prepared = await manager.prepare(source.name, note, key=key)
        except SQLAlchemyError as exc:
            log.error("fhir.notify.unavailable", source=source.name, error=type(exc).__name__)
            self._count(source.name, label, "unavailable")
            return self._unavailable()
        try:
            duplicates = await self._store(request, source, note, parsed, body, peer, prepared)
        except FhirRejected as exc:
            self._count(source.name, label, "invalid")
            return JSONResponse(exc.outcome, status_code=422, media_type=FHIR_JSON)
        except StorageUnavailable:
            self._count(source.name, label, "unavailable")
            return self._unavailable()
        try:
            await manager.commit(note, prepared)
        except SQLAlchemyError as exc:
            # Stored and promised already; a number not recorded shows as a gap later,
            # which costs one search.
            log.warning("fhir.notify.state_not_saved", source=source.name, error=type(exc).__name__)
        if prepared.followups:
            manager.wake()
        self._count(source.name, label, "duplicate" if duplicates else "accepted")
        log.info(
            "fhir.notify.received",
            source=source.name,
            type=note.type,
            payload=note.payload,
            resources=len(note.resources),
            followups=prepared.followups,
            missed=len(prepared.missing),
        )
        return _outcome(200, [Issue("information", "informational", "notification received")])

    async def _store(
        self,
        request: Request,
        source: FhirSourceConfig,
        note: Notification,
        parsed: Any,
        body: bytes,
        peer: str,
        prepared: Prepared,
    ) -> bool:
        """Store what the notification brought; True when all of it was held already."""
        now = self.context.clock()
        timeout = self.config.ingest.commit_timeout_seconds
        headers = self._kept_headers(request, note, prepared)
        announced = note.style != "rest-hook" and note.type in ("event-notification", "query-event")
        if announced and isinstance(parsed, Mapping):
            row = intake_row(source.name, parsed, body, peer=peer, received_at=now, headers=headers)
            if row.row["dedup_key"] is None and isinstance(parsed.get("id"), str):
                # A server retrying a notification sends the same Bundle (same id, same
                # bytes): keep one announcement.
                basis = f"notification\x1f{source.name}\x1f{parsed['id']}\x1f"
                digest = hashlib.sha256(body).hexdigest()
                row.row["dedup_key"] = hashlib.sha256((basis + digest).encode()).hexdigest()
            await intake_store(self.context.writer, [row], timeout=timeout)
        if not note.resources:
            return False
        # A rest-hook body IS the resource: stored byte for byte. Resources inside a
        # Bundle are stored on their own, compact.
        items = [
            (resource, body if note.style == "rest-hook" else compact(resource))
            for resource in note.resources
        ]
        accepted = await accept_resources(
            self.context.writer,
            source,
            items,
            peer=peer,
            received_at=now,
            headers=headers,
            commit_timeout=timeout,
        )
        return accepted.duplicates == len(items)

    def _kept_headers(
        self, request: Request, note: Notification, prepared: Prepared
    ) -> dict[str, str]:
        out = {
            name: request.headers[name]
            for name in ("content-type", "x-request-id")
            if name in request.headers
        }
        out["x-refloop-notification"] = f"{note.style} {note.type} {note.payload}"
        if note.subscription is not None:
            out["x-refloop-subscription-id"] = note.subscription.id
        numbers = [str(e.number) for e in note.events if e.number is not None]
        if numbers:
            out["x-refloop-event-numbers"] = ",".join(numbers[:50])
        return out

    def _unavailable(self) -> Response:
        return _outcome(
            503,
            [Issue("error", "transient", "the notification could not be stored; send it again")],
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
