"""The HTTP app: health, readiness and Prometheus metrics (later: FHIR, API, UI)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from engine.metrics import Metrics

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def read_body(request: Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is (or declares to be) longer than ``limit``:
    read as it arrives, so an oversize body is abandoned without being held."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def build_app(
    metrics: Metrics,
    *,
    database_ok: Callable[[], bool],
    listeners_ok: Callable[[], Sequence[tuple[str, bool]]],
    exposition: Callable[[], bytes] | None = None,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    page = exposition or metrics.exposition

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        db = await asyncio.to_thread(database_ok)
        listeners = {name: up for name, up in listeners_ok()}
        ready = db and all(listeners.values())
        body = {
            "status": "ready" if ready else "not_ready",
            "database": "ok" if db else "unreachable",
            "listeners": {n: "bound" if up else "down" for n, up in listeners.items()},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(page(), media_type=PROMETHEUS_CONTENT_TYPE)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            # The FHIR endpoints (engine.edges.fhir_api.fhir_routes), when configured.
            *extra_routes,
        ]
    )
