"""Hook for the Envoy rows (Envoy alone, + do-nothing ext_authz, + sidecar).

This module builds no Envoy configuration. Whoever starts Envoy (the integrator's harness) hands
over its URL, the HTTP cases to send through it and the pids whose CPU should count as "server"
(Envoy, and the ext_authz server behind it), and gets report rows back::

    rows = measure_envoy("envoy+sidecar", "http://127.0.0.1:10000", cases,
                         pids=[envoy.pid, sidecar.pid], settings=settings)

To have ``python -m bench`` run it, write a target factory that starts Envoy and yields
``envoy_target(...)`` (see bench/README.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bench.cases import HttpCase
from bench.runner import CaseResult, Settings, run_target
from bench.targets import RunningTarget


def envoy_target(
    name: str,
    url: str,
    cases: Sequence[HttpCase],
    pids: Sequence[int],
    *,
    pin: bool = True,
    info: Mapping[str, object] | None = None,
) -> RunningTarget:
    """Describe an already-running Envoy at ``url`` (e.g. ``http://127.0.0.1:10000``) as a target.

    ``pin=True`` moves ``pids`` (Envoy and any ext_authz server) onto the server CPUs, leaving
    the other CPUs to h2load, as for the direct gRPC rows.
    """
    return RunningTarget(name, url, list(cases), list(pids), dict(info or {}), pin)


def measure_envoy(
    name: str,
    url: str,
    cases: Sequence[HttpCase],
    *,
    pids: Sequence[int],
    settings: Settings,
    pin: bool = True,
) -> list[CaseResult]:
    """Measure HTTP cases through an Envoy listener already running at ``url``."""
    return run_target(envoy_target(name, url, cases, pids, pin=pin), settings)
