"""Revocation propagation across control-plane replicas, with and without the Redis bus.

Two ControlPlane replicas share one SQLite file; three sidecars follow them (two on replica B,
one on A). Each round creates a key on A, waits until every sidecar allows it, waits a random
part of a heartbeat (so rounds do not line up with B's re-read), revokes the key on A and times
until every sidecar denies it. Run: ``python -m bench.redis_propagation [--rounds 40]``."""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as pb_grpc
from sidecar.authz.decision import Reason
from sidecar.authz.engine import CheckInput
from sidecar.config import SidecarSettings, load_settings
from sidecar.controlplane import ControlPlane
from sidecar.dataplane.process import Sidecar
from sidecar.devtools.redis_server import RedisServer


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.0005)


def _decide(sidecar: Sidecar, secret: str) -> Reason:
    headers = {"authorization": f"Bearer {secret}"}
    view = CheckInput("GET", "/v1/workspaces/acme/checks", "api", headers, {})
    return sidecar.engine.check(view).reason


def run(redis_url: str, rounds: int, heartbeat: float) -> list[float]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)  # type: ignore[arg-type]

    with tempfile.TemporaryDirectory() as tmp:
        planes = []
        for _ in range(2):
            settings = load_settings(
                {
                    "data_dir": str(Path(tmp) / "shared"),
                    "admin_addr": "127.0.0.1:0",
                    "http_addr": "127.0.0.1:0",
                    "sync_heartbeat": str(heartbeat),
                    "redis_url": redis_url,
                },
                environ={},
            )
            planes.append(ControlPlane(settings))
        minted = planes[0].bootstrap()
        assert minted is not None
        for plane in planes:
            call(plane.start())
        a, b = planes
        sidecars = [
            Sidecar(
                SidecarSettings(
                    listen="127.0.0.1:0",
                    metrics_addr="",  # no status port: never the fixed 9192
                    control_plane=f"127.0.0.1:{plane.admin_port}",
                    state_dir=Path(tmp) / f"sidecar-{i}",
                    sync_token=plane.sync_token,  # both replicas read the shared data dir's
                )
            )
            for i, plane in enumerate((b, b, a))
        ]
        for sc in sidecars:
            sc.start()
        meta = (("authorization", f"Bearer {minted.secret}"),)
        stub = pb_grpc.ApiKeyServiceStub(grpc.insecure_channel(f"127.0.0.1:{a.admin_port}"))
        took: list[float] = []
        try:
            for _ in range(rounds):
                req = pb.CreateApiKeyRequest(workspace="acme", name="b", scopes=["checks:read"])
                resp = stub.CreateApiKey(req, metadata=meta)
                _wait(lambda k=resp.key: all(_decide(s, k) is Reason.OK for s in sidecars))
                time.sleep(random.uniform(0, heartbeat))
                stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=resp.api_key.id), metadata=meta)
                start = time.monotonic()
                _wait(
                    lambda k=resp.key: all(
                        _decide(s, k) is Reason.REVOKED_CREDENTIAL for s in sidecars
                    )
                )
                took.append(time.monotonic() - start)
        finally:
            for sc in sidecars:
                sc.stop(grace=0.2)
            for plane in planes:
                call(plane.aclose(grace=0.5))
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
    return took


def summary(name: str, took: list[float]) -> str:
    ms = sorted(t * 1000 for t in took)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return (
        f"{name:28s} n={len(ms):3d}  p50 {statistics.median(ms):7.1f} ms  "
        f"p99 {p99:7.1f} ms  max {ms[-1]:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    args = parser.parse_args()
    with RedisServer() as server:
        with_redis = run(server.url, args.rounds, args.heartbeat)
    without = run("", args.rounds, args.heartbeat)
    print(summary("with Redis bus", with_redis))
    print(summary(f"without (heartbeat {args.heartbeat:g} s)", without))


if __name__ == "__main__":
    main()
