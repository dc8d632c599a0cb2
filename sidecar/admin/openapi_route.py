"""``GET /openapi.json``: the admin API's OpenAPI document, generated from the same descriptors
the routes are (docs/openapi.json is the committed copy)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sidecar.admin.openapi import render

PATH = "/openapi.json"


def openapi_routes() -> list[BaseRoute]:
    text = render().encode()

    async def spec(_request: Request) -> Response:
        return Response(text, media_type="application/json")

    return [Route(PATH, spec, methods=["GET"])]
