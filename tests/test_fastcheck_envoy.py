"""The bench's Envoy allow (bench/envoy_targets.py: a key in ``authorization`` on the checks
route) sent through a real Envoy (the shipped front proxy, and the bench's configuration of it)
to a sidecar as shipped: every check Envoy sends for it is decided, and observed, in C — none
falls back to the Python path. Envoy's CheckRequest carries
more than the bench's direct one (every header, both addresses, the route's context
extensions); a field that sent the C path back to Python would cost the Envoy row alone."""

from __future__ import annotations

import http.client
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.envoy_targets import direct_responses
from sidecar.dataplane.fastcheck import FastCheckHandler, unavailable
from sidecar.dataplane.process import Sidecar
from sidecar.devtools.echo_upstream import EchoUpstream
from tests.conftest import RunningControlPlane, wait_until
from tests.support.envoy import EnvoyProcess
from tests.support.ops import create_key

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(bool(unavailable()), reason=f"not built: {unavailable()}"),
]
CHECKS = "/v1/workspaces/acme/checks"
REQUESTS = 20


def _bench_routes(config: dict[str, Any]) -> None:
    direct_responses(config, authz=True)


@pytest.fixture(params=[None, _bench_routes], ids=["front-proxy", "bench"])
def through_envoy(
    request: pytest.FixtureRequest,
    control_plane: RunningControlPlane,
    sidecar_factory: Callable[..., Sidecar],
) -> Iterator[tuple[Sidecar, EnvoyProcess, str]]:
    sc = sidecar_factory()
    secret, _ = create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    wait_until(lambda: len(sc.replica.by_digest) >= 2)
    with (
        EchoUpstream() as echo,
        EnvoyProcess(
            authz=("127.0.0.1", sc.port),
            upstream=("127.0.0.1", echo.port),
            customize=request.param,
        ) as envoy,
    ):
        yield sc, envoy, secret


def _counted(fast: FastCheckHandler) -> tuple[int, int, int]:
    decided, fell_back = fast.counts()
    return decided, fell_back, fast.observed()


def _http1(envoy: EnvoyProcess, secret: str) -> None:
    for _ in range(REQUESTS):
        conn = http.client.HTTPConnection("127.0.0.1", envoy.listen_port, timeout=10)
        try:
            conn.request("GET", CHECKS, headers={"authorization": f"Bearer {secret}"})
            assert conn.getresponse().status == 200
        finally:
            conn.close()


def _h2load(envoy: EnvoyProcess, secret: str) -> None:
    # As the bench sends it: h2load over HTTP/2 cleartext, several streams on one connection.
    argv = ["h2load", "-n", str(REQUESTS), "-c", "1", "-m", "4"]
    argv += ["-H", f"authorization: Bearer {secret}", f"{envoy.url}{CHECKS}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"{REQUESTS} 2xx" in out, out


@pytest.mark.parametrize(
    "send",
    [
        _http1,
        pytest.param(
            _h2load,
            marks=pytest.mark.skipif(shutil.which("h2load") is None, reason="no h2load"),
        ),
    ],
)
def test_every_check_envoy_sends_for_the_bench_allow_is_decided_and_observed_in_c(
    through_envoy: tuple[Sidecar, EnvoyProcess, str],
    send: Callable[[EnvoyProcess, str], None],
) -> None:
    sc, envoy, secret = through_envoy
    fast = sc.fast_check
    assert fast is not None and fast.observed_in_c
    before = _counted(fast)
    send(envoy, secret)
    decided, fell_back, observed = (a - b for a, b in zip(_counted(fast), before, strict=True))
    assert (decided, fell_back, observed) == (REQUESTS, 0, REQUESTS)
