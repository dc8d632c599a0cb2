"""Composition of the HTTP app: each feature contributes a list of routes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute


def build_app(
    *route_groups: Sequence[BaseRoute], exception_handlers: Mapping[Any, Any] | None = None
) -> Starlette:
    """One Starlette app serving every group's routes (e.g. ``oauth_routes(...)``, the admin
    API, ``/metrics``, ``/healthz``, ``/readyz``)."""
    routes: list[BaseRoute] = []
    for group in route_groups:
        routes.extend(group)
    return Starlette(routes=routes, exception_handlers=dict(exception_handlers or {}))
