"""The real-Envoy harness; it lives in :mod:`sidecar.devtools.envoy` so the bench can use it."""

from sidecar.devtools.envoy import (
    AUTHZ_CLUSTER,
    DEFAULT_CONFIG,
    LISTENER_NAME,
    UPSTREAM_CLUSTER,
    Address,
    EnvoyError,
    EnvoyProcess,
    find_envoy,
    point_cluster,
    point_listener,
    render_config,
)

__all__ = [
    "AUTHZ_CLUSTER",
    "DEFAULT_CONFIG",
    "LISTENER_NAME",
    "UPSTREAM_CLUSTER",
    "Address",
    "EnvoyError",
    "EnvoyProcess",
    "find_envoy",
    "point_cluster",
    "point_listener",
    "render_config",
]
