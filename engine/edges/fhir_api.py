"""The FHIR R4 REST endpoints under ``/fhir/r4/``: writes in, refloop's view out.

Theory of operation
-------------------
Writes: ``POST /fhir/r4/<Type>`` and ``PUT /fhir/r4/<Type>/<id>`` for ServiceRequest,
Task, Appointment, DocumentReference, DiagnosticReport and Communication, and a
``transaction`` or ``batch`` Bundle at ``POST /fhir/r4`` (or ``/fhir/r4/Bundle``). Each
request passes, in order:

1. the credential (:mod:`engine.edges.fhir_auth`): it names the source → 401 / 403;
2. the path: a type without an endpoint → 400, an unknown path → 404;
3. the media type (``application/fhir+json`` or ``application/json``, UTF-8) → 415;
4. the size: the body is read incrementally up to the source's ``max_body_bytes`` → 413;
5. JSON → 400, the resource type of the endpoint → 400, the R4B model → 422 (every
   OperationOutcome names the element path, never the value);
6. the store: one ``messages`` row per resource (:mod:`engine.services.fhir_intake`),
   committed by the group-commit writer. Only then the answer: 201 (POST) or 200 (PUT)
   with ``Location: <base>/<Type>/<id>[/_history/<v>]``, 200 with the original's
   location for a duplicate, 409 when a known version arrives with other content, 503
   with Retry-After when the database cannot commit. Nothing answered 2xx is lost.

A POST without an id is answered with a uuid refloop derives from the source and the
payload digest (:func:`engine.protocol.fhir.generated_id`): the stored bytes stay as
sent. A transaction is refused whole when any entry is invalid; a batch stores its good
entries and answers each bad one in the batch-response. The writer commits a
transaction's rows together when they are queued together, but not atomically: a
storage failure half way answers 503 with some rows stored (a resend of those is a
duplicate when they carry a version id or If-None-Exist). An entry is stored as its
resource re-serialised compactly (a decimal like ``1.50`` then reads ``1.5``), its
references to other entries made self-standing, and the Bundle itself is kept byte for
byte as a ``FHIR:Bundle`` row (:func:`engine.services.fhir_intake.prepare_bundle`).
Entries may carry any R4 resource type (a referral Bundle brings its Patient and
Practitioners); the mappings decide what each one means.

Reads (the facade for EHRs that poll, any source's credential): ``GET
/fhir/r4/ServiceRequest/<referral id>`` and ``GET /fhir/r4/Task?based-on=
ServiceRequest/<referral id>``, answered by :mod:`engine.edges.fhir_facade` once this
shell has authenticated the caller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from engine.config import Config, FhirSourceConfig
from engine.edges.fhir_auth import FhirAuth, forbidden, header, signature_hex, unauthorized
from engine.edges.fhir_facade import Answer, FacadeRefusal, ReadFacade
from engine.edges.http_app import read_body
from engine.logs import get_logger
from engine.metrics import Metrics
from engine.protocol.fhir import (
    FHIR_JSON,
    JSON_MEDIA_TYPES,
    WRITABLE,
    Entry,
    FhirJsonError,
    Issue,
    bundle_entries,
    error,
    is_id,
    known_type,
    operation_outcome,
    parse_resource,
    validate,
)
from engine.services.fhir_intake import (
    KEPT_HEADERS,
    Prepared,
    Result,
    prepare,
    prepare_bundle,
    store,
)
from engine.services.writer import GroupCommitWriter, StorageUnavailable
from engine.store.fhir_read import message_control_id

log = get_logger("refloop.fhir")

BASE = "/fhir/r4"
RETRY_AFTER_SECONDS = 10
_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    409: "Conflict",
    422: "Unprocessable Entity",
}


class _Refused(Exception):
    """An answer other than success, with the metric outcome it counts as."""

    def __init__(
        self,
        status: int,
        issues: Sequence[Issue],
        outcome: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(outcome)
        self.status = status
        self.issues = list(issues)
        self.outcome = outcome
        self.headers = dict(headers or {})


def fhir_routes(
    config: Config,
    writer: GroupCommitWriter,
    metrics: Metrics,
    engine: Engine,
    *,
    notify_routes: Sequence[BaseRoute] = (),
    auth: FhirAuth | None = None,
) -> list[BaseRoute]:
    """The ``/fhir/r4`` routes for ``build_app(extra_routes=...)``; ``notify_routes`` (the
    subscription notification endpoints) are matched before the catch-all 404, and
    ``auth`` may be shared with them (secrets read once)."""
    api = FhirApi(config, writer, metrics, engine, auth)
    return [
        *notify_routes,
        Route(BASE, api.bundle, methods=["POST"]),
        Route(f"{BASE}/", api.bundle, methods=["POST"]),
        Route(f"{BASE}/Bundle", api.bundle, methods=["POST"]),
        Route(f"{BASE}/ServiceRequest/{{id}}", api.read_service_request, methods=["GET"]),
        Route(f"{BASE}/Task", api.search_task, methods=["GET"]),
        Route(f"{BASE}/{{type}}", api.create, methods=["POST"]),
        Route(f"{BASE}/{{type}}/{{id}}", api.update, methods=["PUT"]),
        Route(f"{BASE}/{{rest:path}}", api.fallback),
        Route(BASE, api.fallback),
    ]


class FhirApi:
    def __init__(
        self,
        config: Config,
        writer: GroupCommitWriter,
        metrics: Metrics,
        engine: Engine,
        auth: FhirAuth | None = None,
    ) -> None:
        self._writer = writer
        self._metrics = metrics
        self._engine = engine
        self._facade = ReadFacade(engine)
        self._timeout = config.ingest.commit_timeout_seconds
        self.auth = auth or FhirAuth.from_config(config)
        for source in self.auth.sources:
            metrics.declare_fhir_source(source.name)

    # -- writes -----------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        rtype = request.path_params["type"]
        return await self._guarded(request, _label(rtype), lambda: self._write(request, rtype))

    async def update(self, request: Request) -> Response:
        rtype = request.path_params["type"]
        rid = request.path_params["id"]
        return await self._guarded(request, _label(rtype), lambda: self._write(request, rtype, rid))

    async def bundle(self, request: Request) -> Response:
        return await self._guarded(request, "Bundle", lambda: self._bundle(request))

    async def _write(
        self, request: Request, path_type: str, path_id: str | None = None
    ) -> tuple[str, str, Response]:
        source = await self._caller(request, body=True)
        if path_type not in WRITABLE:
            raise _unsupported_type(path_type)
        if path_id is not None and not is_id(path_id):
            raise _Refused(
                400, [error("invalid", "the id in the URL is not a FHIR id", "id")], "invalid"
            )
        body = await self._body(request, source)
        received_at = datetime.now(UTC)
        resource = _parse(body)
        if resource["resourceType"] != path_type:
            issue = error(
                "invalid",
                f"this endpoint takes {path_type} resources; the body is another type",
                "resourceType",
            )
            raise _Refused(400, [issue], "invalid")
        if path_id is not None:
            if "id" not in resource:
                issue = error("required", "an update carries the id of its URL", f"{path_type}.id")
                raise _Refused(400, [issue], "invalid")
            if resource["id"] != path_id:
                issue = error("invalid", "must equal the id in the URL", f"{path_type}.id")
                raise _Refused(400, [issue], "invalid")
        issues = validate(resource)
        if issues:
            raise _Refused(422, issues, "invalid")
        if_none_exist = header(request.headers, "if-none-exist") if path_id is None else None
        prepared = prepare(
            source.name,
            resource,
            body,
            peer=_peer(request),
            received_at=received_at,
            headers=_kept(request.headers),
            if_none_exist=if_none_exist or None,
        )
        [result] = await self._store([prepared])
        location = await self._location(result)
        base = _base(request)
        if result.kind == "conflict":
            raise _Refused(409, [_conflict_issue(result)], "conflict")
        headers = {"Location": f"{base}/{location}"}
        if result.prepared.version:
            headers["ETag"] = f'W/"{result.prepared.version}"'
        if result.kind == "duplicate":
            text = "already received: the original stands, this changed nothing"
            answer = _answer(request, 200, text, body, headers)
            return source.name, "duplicate", answer
        status = 201 if path_id is None else 200
        answer = _answer(request, status, f"stored as {location}", body, headers)
        return source.name, "accepted", answer

    async def _bundle(self, request: Request) -> tuple[str, str, Response]:
        source = await self._caller(request, body=True)
        body = await self._body(request, source)
        received_at = datetime.now(UTC)
        bundle = _parse(body)
        if bundle["resourceType"] != "Bundle":
            issue = error(
                "invalid",
                "the base URL takes a transaction or batch Bundle; post other resources to "
                "/fhir/r4/<type>",
                "resourceType",
            )
            raise _Refused(400, [issue], "invalid")
        check = bundle_entries(bundle)
        if check.issues:
            raise _Refused(check.status, check.issues, "invalid")
        bad = [e for e in check.entries if not e.ok]
        if check.kind == "transaction" and bad:
            status = 422 if all(e.status == 422 for e in bad) else 400
            raise _Refused(status, [i for e in bad for i in e.issues], "invalid")
        rows = prepare_bundle(
            source.name,
            bundle,
            body,
            check,
            peer=_peer(request),
            received_at=received_at,
            headers=_kept(request.headers),
        )
        # The Bundle's own row is a record: it is stored with the entries (a 2xx keeps
        # what was sent) but the entries alone decide the answer.
        _, *stored_entries = await self._store([rows.record, *rows.entries.values()])
        results = dict(zip(rows.entries, stored_entries, strict=True))
        conflicts = [(n, r) for n, r in results.items() if r.kind == "conflict"]
        if check.kind == "transaction" and conflicts:
            issues = [_conflict_issue(r, f"Bundle.entry[{n}].resource") for n, r in conflicts]
            issues.append(
                Issue(
                    "information",
                    "informational",
                    "the other entries were stored; sent again, those with a meta.versionId "
                    "or ifNoneExist are recognised as duplicates",
                )
            )
            raise _Refused(409, issues, "conflict")
        response_entries = []
        for entry in check.entries:
            result = results.get(entry.index)
            response_entries.append({"response": await self._entry_response(entry, result)})
        answer = {
            "resourceType": "Bundle",
            "type": f"{check.kind}-response",
            "entry": response_entries,
        }
        stored = [r for r in results.values() if r.kind != "conflict"]
        if any(r.kind == "created" for r in stored):
            outcome = "accepted"
        elif stored:
            outcome = "duplicate"
        else:
            outcome = "conflict" if conflicts else ("invalid" if bad else "accepted")
        return source.name, outcome, _json(200, answer)

    async def _entry_response(self, entry: Entry, result: Result | None) -> dict[str, Any]:
        if result is None:
            return {
                "status": f"{entry.status} {_REASONS[entry.status]}",
                "outcome": operation_outcome(entry.issues),
            }
        if result.kind == "conflict":
            return {
                "status": "409 Conflict",
                "outcome": operation_outcome([_conflict_issue(result, "resource")]),
            }
        status = 201 if result.kind == "created" and entry.method == "POST" else 200
        out: dict[str, Any] = {
            "status": f"{status} {_REASONS[status]}",
            "location": await self._location(result),
        }
        if result.prepared.version:
            out["etag"] = f'W/"{result.prepared.version}"'
        return out

    async def _store(self, prepared: list[Prepared]) -> list[Result]:
        if not prepared:
            return []
        try:
            return await store(self._writer, prepared, timeout=self._timeout)
        except StorageUnavailable:
            raise _unavailable("refloop could not store the request; send it again later") from None

    async def _location(self, result: Result) -> str:
        if result.kind != "duplicate" or not result.prepared.conditional:
            return result.prepared.location
        # A conditional create matched: the answer names what was created first.
        assert result.original_id is not None
        original = result.original_id
        try:
            found = await asyncio.to_thread(self._control_id, original)
        except SQLAlchemyError:
            found = None
        return found or result.prepared.location

    def _control_id(self, message_id: int) -> str | None:
        with self._engine.connect() as conn:
            return message_control_id(conn, message_id)

    # -- reads (engine.edges.fhir_facade) ---------------------------------------------

    async def read_service_request(self, request: Request) -> Response:
        rid = request.path_params["id"]
        return await self._guarded(
            request,
            "ServiceRequest",
            lambda: self._read(request, lambda name: self._facade.service_request(name, rid)),
        )

    async def search_task(self, request: Request) -> Response:
        def ask(name: str) -> Awaitable[Answer]:
            values = request.query_params.getlist("based-on")
            self_url = str(request.url)
            return self._facade.tasks(name, values, base=_base(request), self_url=self_url)

        return await self._guarded(request, "Task", lambda: self._read(request, ask))

    async def _read(
        self, request: Request, ask: Callable[[str], Awaitable[Answer]]
    ) -> tuple[str, str, Response]:
        source = await self._caller(request, body=False)
        try:
            answer = await ask(source.name)
        except FacadeRefusal as refused:
            raise _Refused(refused.status, refused.issues, refused.outcome) from None
        except SQLAlchemyError:
            raise _unavailable("refloop cannot read its database; try again later") from None
        return source.name, answer.outcome, _json(answer.status, answer.body, answer.headers)

    # -- everything else --------------------------------------------------------------

    async def fallback(self, request: Request) -> Response:
        parts = [p for p in request.url.path.removeprefix(BASE).split("/") if p]
        source = self.auth.by_bearer(request.headers)
        name = source.name if source else "unknown"
        label = _label(parts[0]) if parts else "other"
        self._metrics.fhir_requests.labels(name, label, "unsupported").inc()
        writable = len(parts) in (1, 2) and parts[0] in WRITABLE
        if writable or not parts:
            reads = {("Task", 1), ("ServiceRequest", 2)}
            allow = "POST" if len(parts) <= 1 else "PUT"
            if parts and (parts[0], len(parts)) in reads:
                allow = f"GET, {allow}"
            issue = error("not-supported", f"this URL takes {allow}")
            return _json(405, operation_outcome([issue]), {"Allow": allow})
        if len(parts) in (1, 2) and known_type(parts[0]):
            return _json(400, operation_outcome([_unsupported_type(parts[0]).issues[0]]))
        issue = error("not-found", "no such FHIR endpoint here")
        return _json(404, operation_outcome([issue]))

    # -- the common shell -------------------------------------------------------------

    async def _guarded(
        self,
        request: Request,
        label: str,
        work: Callable[[], Awaitable[tuple[str, str, Response]]],
    ) -> Response:
        """Run one request: count it, answer refusals with an OperationOutcome, and never
        let a bug become a bare 500 without one."""
        started = time.perf_counter()
        request.state.fhir_source = "unknown"
        try:
            name, outcome, response = await work()
        except _Refused as refused:
            name, outcome = request.state.fhir_source, refused.outcome
            response = self._refusal(refused)
            log.info(
                "fhir.request.refused",
                source=name,
                resource=label,
                status=refused.status,
                outcome=outcome,
                # The code only: an element path can hold a member name from the body.
                issue=refused.issues[0].code if refused.issues else None,
            )
        except ClientDisconnect:
            log.info("fhir.request.disconnected", source=request.state.fhir_source)
            return Response(status_code=400)
        except Exception as exc:
            log.error("fhir.request.failed", resource=label, error=type(exc).__name__)
            name, outcome = request.state.fhir_source, "unavailable"
            issue = Issue("error", "exception", "refloop failed to handle this request")
            response = _json(500, operation_outcome([issue]))
        else:
            log.debug(
                "fhir.request.done",
                source=name,
                resource=label,
                outcome=outcome,
                seconds=round(time.perf_counter() - started, 4),
            )
        self._metrics.fhir_requests.labels(name, label, outcome).inc()
        return response

    def _refusal(self, refused: _Refused) -> Response:
        if refused.status == 401:
            return unauthorized()
        if refused.status == 403:
            return forbidden()
        return _json(refused.status, operation_outcome(refused.issues), refused.headers)

    async def _caller(self, request: Request, *, body: bool) -> FhirSourceConfig:
        """The authenticated source of this request (raises 401 / 403). A signed request
        is identified from its body, which is then kept for :meth:`_body`."""
        ip = request.client.host if request.client else ""
        verdict, source = self.auth.identify(request.headers, ip)
        limit = self.auth.signature_body_limit()
        if verdict == "unauthorized" and body and limit and signature_hex(request.headers):
            raw = await _read_limited(request, limit)
            verdict, source = self.auth.identify(request.headers, ip, raw)
            request.state.fhir_body = raw
        if source is not None:
            request.state.fhir_source = source.name
        if verdict == "unauthorized" or source is None:
            raise _Refused(401, [], "unauthorized")
        if verdict == "forbidden":
            raise _Refused(403, [], "forbidden")
        return source

    async def _body(self, request: Request, source: FhirSourceConfig) -> bytes:
        media = header(request.headers, "content-type")
        if not _json_media(media):
            issue = error(
                "not-supported",
                "send application/fhir+json (or application/json), in UTF-8",
            )
            raise _Refused(415, [issue], "unsupported")
        raw: bytes | None = getattr(request.state, "fhir_body", None)
        if raw is None:
            raw = await _read_limited(request, source.max_body_bytes)
        elif len(raw) > source.max_body_bytes:
            raise _too_large(source.max_body_bytes)
        return raw


# -- request helpers --------------------------------------------------------------------


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, abandoned once past ``limit`` (413)."""
    body = await read_body(request, limit)
    if body is None:
        raise _too_large(limit)
    return body


def _too_large(limit: int) -> _Refused:
    issue = error(
        "too-long", f"the body is over this source's limit of {limit} bytes (max_body_bytes)"
    )
    return _Refused(413, [issue], "too_large")


def _unavailable(text: str) -> _Refused:
    issue = error("transient", text)
    return _Refused(503, [issue], "unavailable", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _unsupported_type(rtype: str) -> _Refused:
    if not known_type(rtype):
        return _Refused(404, [error("not-found", "not a FHIR R4 resource type")], "unsupported")
    issue = error(
        "not-supported",
        f"refloop accepts {', '.join(WRITABLE)} (and transaction or batch Bundles at "
        f"{BASE}); not this resource type",
    )
    return _Refused(400, [issue], "unsupported")


def _conflict_issue(result: Result, where: str | None = None) -> Issue:
    p = result.prepared
    return error(
        "conflict",
        f"{p.location} was already received from this source with different content; a "
        "changed resource needs a new meta.versionId",
        f"{where or p.resource_type}.meta.versionId",
    )


def _parse(body: bytes) -> dict[str, Any]:
    try:
        return parse_resource(body)
    except FhirJsonError as exc:
        raise _Refused(400, [exc.issue], "invalid") from None


def _json_media(value: str | None) -> bool:
    if not value:
        return False
    media, *params = (p.strip() for p in value.split(";"))
    if media.lower() not in JSON_MEDIA_TYPES:
        return False
    for param in params:
        name, _, raw = param.partition("=")
        setting = raw.strip().strip('"').lower()
        if name.strip().lower() == "charset" and setting not in ("utf-8", "utf8"):
            return False
        if name.strip().lower() == "fhirversion" and not setting.startswith(("4.0", "4.3")):
            return False
    return True


def _label(rtype: str) -> str:
    return rtype if rtype in WRITABLE or rtype == "Bundle" else "other"


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + BASE


def _kept(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name in KEPT_HEADERS if (value := header(headers, name))}


def _json(status: int, content: Any, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse(content, status_code=status, media_type=FHIR_JSON, headers=headers)


def _answer(
    request: Request, status: int, text: str, body: bytes, headers: Mapping[str, str]
) -> Response:
    """The success body the client prefers (FHIR ``Prefer: return=``): by default an
    OperationOutcome saying what happened."""
    prefer = (header(request.headers, "prefer") or "").replace(" ", "").lower()
    if "return=minimal" in prefer:
        return Response(status_code=status, headers=headers)
    if "return=representation" in prefer:
        return Response(body, status_code=status, media_type=FHIR_JSON, headers=headers)
    outcome = operation_outcome([Issue("information", "informational", text)])
    return _json(status, outcome, headers)
