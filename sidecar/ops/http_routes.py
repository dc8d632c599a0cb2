"""The control plane's ``/metrics``, ``/healthz`` and ``/readyz`` as Starlette routes, to be
mounted into the HTTP app on ``http_addr`` (the OAuth app; sidecar/ops/http_server.py serves them
alone until then)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.ops.health import Health

NO_STORE = {"Cache-Control": "no-store"}


def ops_routes(
    registry: CollectorRegistry, readiness: Callable[[], Awaitable[Health]]
) -> list[Route]:
    """Routes for Prometheus and the Kubernetes probes. ``readiness`` decides ``/readyz``:
    200 while serving or degraded, 503 otherwise, with ``{"status", "reasons"}``."""

    async def metrics(_request: Request) -> Response:
        # Rendering takes a few milliseconds with many label sets: keep it off the event loop.
        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers=NO_STORE)

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers=NO_STORE)

    async def readyz(_request: Request) -> Response:
        report = await readiness()
        return Response(
            report.body(),
            status_code=200 if report.ready else 503,
            media_type="application/json",
            headers=NO_STORE,
        )

    return [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
