"""Helpers for the operability tests: keys minted over the real admin API, CheckRequests sent to
a real sidecar, Prometheus text scraped over HTTP and parsed with prometheus-client's parser."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as pb_grpc
from sidecar.config import SidecarSettings, load_settings, load_sidecar_settings
from sidecar.controlplane import ControlPlane
from sidecar.core.clock import Clock
from sidecar.dataplane.process import Sidecar
from tests.support.sync import TEST_SYNC_TOKEN

if TYPE_CHECKING:
    from tests.conftest import LoopThread

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def create_key(
    address: str,
    operator_key: str,
    scopes: list[str],
    workspace: str = "acme",
    credentials: grpc.ChannelCredentials | None = None,
) -> tuple[str, str]:
    """Mint a key over the admin API; return ``(secret, key_id)``."""
    channel = (
        grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    )
    with channel:
        resp = pb_grpc.ApiKeyServiceStub(channel).CreateApiKey(
            pb.CreateApiKeyRequest(workspace=workspace, name="ops-test", scopes=scopes),
            metadata=(("authorization", f"Bearer {operator_key}"),),
            timeout=10,
        )
    return resp.key, resp.api_key.id


def check_request(
    path: str, headers: Mapping[str, str] | None = None, method: str = "GET"
) -> ext.CheckRequest:
    """A CheckRequest shaped like Envoy's (lower-case headers, pseudo-headers included)."""
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method = method
    http.path = path
    http.host = "api.statuspulse.test"
    http.headers.update({":method": method, ":path": path, ":authority": http.host})
    http.headers.update(headers or {})
    req.attributes.source.address.socket_address.address = "127.0.0.1"
    return req


def call_check(
    port: int, request: ext.CheckRequest, metadata: tuple[tuple[str, str], ...] = ()
) -> ext.CheckResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return ext_grpc.AuthorizationStub(channel).Check(request, metadata=metadata, timeout=5)


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def http_get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """``(status, body)``; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:  # noqa: S310
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def ready(url: str) -> tuple[int, dict[str, object]]:
    status, body = http_get(url + "/readyz")
    return status, json.loads(body)


def scrape(url: str) -> Samples:
    """Every sample of ``url``/metrics, keyed by (sample name, labels)."""
    status, body = http_get(url + "/metrics")
    assert status == 200, body
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(predicate: Callable[[], object], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.05)


def sidecar_settings(control_plane: str, state_dir: Path, **overrides: object) -> SidecarSettings:
    values: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "control_plane": control_plane,
        "state_dir": str(state_dir),
        "metrics_addr": "127.0.0.1:0",
        "sync_token": TEST_SYNC_TOKEN,
        **overrides,
    }
    return load_sidecar_settings(values, environ={})


@contextmanager
def running_sidecar(settings: SidecarSettings, clock: Clock | None = None) -> Iterator[Sidecar]:
    """A started in-process sidecar, stopped (drained) afterwards."""
    sidecar = Sidecar(settings, clock)
    sidecar.start()
    try:
        yield sidecar
    finally:
        sidecar.stop(grace=1)


def status_url(sidecar: Sidecar) -> str:
    assert sidecar.status_server is not None
    return f"http://127.0.0.1:{sidecar.status_server.port}"


@contextmanager
def plane_on(
    addr: str, data_dir: Path, clock: Clock, loop: LoopThread, **settings: object
) -> Iterator[tuple[ControlPlane, str]]:
    """A control plane on a fixed admin address (so a sidecar can be pointed at it first)."""
    data_dir.mkdir(exist_ok=True)
    values = {
        "data_dir": str(data_dir),
        "admin_addr": addr,
        "http_addr": "127.0.0.1:0",
        "sync_token": TEST_SYNC_TOKEN,
    }
    plane = ControlPlane(load_settings({**values, **settings}, environ={}), clock=clock)
    minted = plane.bootstrap()
    loop.run(plane.start())
    try:
        yield plane, minted.secret if minted else ""
    finally:
        loop.run(plane.aclose(grace=0))
