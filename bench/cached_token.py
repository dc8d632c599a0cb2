"""A cached RS256 access token on the Check path, in process (docs/performance.md, "Cached tokens
observed in C"):

    python -m bench.cached_token          # thread CPU µs per check, compiled and Python paths
    python -m bench.cached_token server   # server CPU µs per call over gRPC, do-nothing beside

Both build an engine with a token verifier and the sidecar's observers as shipped (metrics,
denial log, decision records with a spool write every 60 checks, usage) and send the same
cached-token request (the bench's ``typical_headers``, 1,264 bytes). Times are the thread's or
the server process's CPU, not wall time: on a shared box the neighbours then matter less.
``server`` runs a one-process gRPC server (4 threads, pinned to CPU 1 when ``taskset`` exists)
with the compiled handler, then the same server answering the same bytes without work, each
driven by 8 callers from this process, alternately, ``--rounds`` times."""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.cases import check_request, typical_headers

ISSUER = "http://127.0.0.1:8080"
AUDIENCE = "statuspulse-api"
PATH = "/v1/workspaces/acme/checks"


def signed_token(kid: str, private: Any, now: float) -> str:
    """The bench's RS256 access token for acme (checks:read, one hour), signed at ``now`` by
    ``private`` under ``kid``."""
    from sidecar.oauth import rfc9068

    return rfc9068.issue(
        (kid, private),
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="usr_1",
        client_id="app_1",
        scopes=frozenset({"checks:read"}),
        workspace="acme",
        grant_id="grt_1",
        now=now,
        ttl=3600,
    ).token


def issue_token(now: float) -> tuple[Any, Any, str]:
    """A signing key as the control plane stores it (private key encrypted under a fresh KEK),
    its private key, and an RS256 access token it signed at ``now`` for acme (checks:read, one
    hour): what the token rows of bench.cached_token and bench.cold_token send."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from sidecar.core.kek import KEK_BYTES, KeyEncryption
    from sidecar.oauth.signing import generate_key

    kek = KeyEncryption([secrets.token_bytes(KEK_BYTES)])
    key = generate_key(int(now) - 60, kek)
    private = serialization.load_der_private_key(
        kek.decrypt(key.private_pem, key.kid), password=None
    )
    assert isinstance(private, rsa.RSAPrivateKey)
    token = signed_token(key.kid, private, now)
    return key, private, token


def _handlers(audit: bool) -> tuple[Any, Any, Any, Any, bytes]:
    """(CheckHandler, its AuditPipeline, FastCheckHandler on a second engine, that engine's
    AuditPipeline, request bytes), the token verified and cached by both."""
    import logging

    from sidecar.auditship import AuditPipeline, ShipConfig
    from sidecar.auditship.observer import DecisionRecorder
    from sidecar.authz.engine import Engine
    from sidecar.authz.policy_source import load_policy
    from sidecar.authz.replica import Replica
    from sidecar.authz.token_verifier import ReplicaTokenVerifier
    from sidecar.core.changes import signing_key_upserted
    from sidecar.core.clock import SystemClock
    from sidecar.dataplane.envoy_check import CheckHandler, parse_check_request
    from sidecar.dataplane.fastcheck import FastCheckHandler
    from sidecar.ops.denial_log import DenialLog
    from sidecar.ops.metrics import DecisionMetrics, Metrics
    from sidecar.usage import UsageTally

    logging.getLogger().handlers[:] = [logging.NullHandler()]
    key, _, token = issue_token(time.time())
    data = check_request(
        typical_headers(authorization=f"Bearer {token}"), path=PATH, host="api.statuspulse.test"
    )
    clock = SystemClock()

    def handler() -> tuple[Any, Any]:
        replica = Replica()
        replica.load_snapshot(1, [signing_key_upserted(key)])
        verifier = ReplicaTokenVerifier(ISSUER, AUDIENCE, max_lifetime=3600)
        engine = Engine(replica, load_policy(None), clock, token_verifier=verifier)
        pipeline = AuditPipeline(ShipConfig(Path(tempfile.mkdtemp())), None)
        observers: list[Any] = [DecisionMetrics(Metrics()), DenialLog(100.0)]
        observers += [DecisionRecorder(pipeline, clock)] if audit else []
        observers.append(UsageTally(clock.now))
        return CheckHandler(engine, observers), pipeline

    python, pipeline = handler()
    fast_handler, fast_pipeline = handler()
    fast = FastCheckHandler(fast_handler)
    python(parse_check_request(data), None)
    fast(data, None)  # type: ignore[arg-type]  # the first use verifies; the token is cached from here on
    return python, pipeline, fast, fast_pipeline, data


def _cpu_us(call: Any, flush: Any, batches: int) -> float:
    """Thread CPU µs per call: best of 7 runs of ``batches`` batches of 60 calls, a spool
    write after each batch (not timed)."""
    best = float("inf")
    for _ in range(7):
        spent = 0.0
        for _ in range(batches):
            started = time.thread_time()
            for _ in range(60):
                call()
            spent += time.thread_time() - started
            flush()
        best = min(best, spent / (batches * 60) * 1e6)
    return best


def _row(audit: bool) -> str:
    from sidecar.dataplane.envoy_check import parse_check_request

    python, pipeline, fast, fast_pipeline, data = _handlers(audit)
    compiled = _cpu_us(lambda: fast(data, None), lambda: fast_pipeline.flush(sync=False), 300)
    reference = _cpu_us(
        lambda: python(parse_check_request(data), None), lambda: pipeline.flush(sync=False), 100
    )
    return (
        f"  audit {'on ' if audit else 'off'}: compiled {compiled:5.2f}, python {reference:5.2f}"
        f" (request {len(data)} bytes; observed in C: {fast.observed()})"
    )


def main() -> None:
    print(f"cached RS256 token, thread CPU µs per check (load {os.getloadavg()[0]:.1f}):")
    for audit in (True, False):
        print(_row(audit))


def serve(noop: bool) -> None:
    """The server process: prints its port and the request, serves until stdin closes."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from sidecar.dataplane.envoy_check import SERVICE, raw_check_method

    _, _, fast, fast_pipeline, data = _handlers(True)
    answer = fast(data, None)
    handler = (lambda request, context: answer) if noop else fast
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    methods = {"Check": raw_check_method(handler)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    server.add_registered_method_handlers(SERVICE, methods)  # type: ignore[attr-defined]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()

    def writer() -> None:  # the audit writer's 10 ms tick
        while not stop.wait(0.01):
            fast_pipeline.flush(sync=False)

    threading.Thread(target=writer, daemon=True).start()
    print(port, data.hex(), flush=True)
    sys.stdin.read()
    stop.set()
    server.stop(0)


def _server_cpu_us(noop: bool, calls: int) -> list[float]:
    """Server CPU µs per call, three reps of ``calls`` from 8 callers."""
    import grpc

    pin = ["taskset", "-c", "1"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    env = {**os.environ, "GRPC_EXPERIMENTS": "-event_engine_listener"}
    argv = [*pin, sys.executable, "-m", "bench.cached_token", "serve-noop" if noop else "serve"]
    with subprocess.Popen(
        argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as server:
        assert server.stdout is not None and server.stdin is not None
        port, request = server.stdout.readline().split()
        data = bytes.fromhex(request)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=None,
            response_deserializer=None,
            _registered_method=True,  # type: ignore[call-arg]
        )
        for _ in range(500):
            call(data)

        def cpu() -> float:
            with open(f"/proc/{server.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def work() -> None:
            for _ in range(calls // 8):
                call(data)

        reps = []
        for _ in range(3):
            before = cpu()
            callers = [threading.Thread(target=work) for _ in range(8)]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join()
            reps.append((cpu() - before) / (calls // 8 * 8) * 1e6)
        channel.close()
        server.stdin.close()
    return reps


def server_main(rounds: int = 5, calls: int = 9000) -> None:
    rows: dict[str, list[float]] = {"do-nothing": [], "compiled": []}
    for _ in range(rounds):
        for name in rows:
            rows[name] += _server_cpu_us(name == "do-nothing", calls)
    print(f"server CPU µs per cached-token call, median of {3 * rounds} reps:")
    for name, reps in rows.items():
        print(f"  {name:10} {statistics.median(reps):6.1f}  ({min(reps):.0f} to {max(reps):.0f})")
    print(f"  load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    command = sys.argv[1:2]
    if command == ["serve"] or command == ["serve-noop"]:
        serve(command == ["serve-noop"])
    elif command == ["server"]:
        server_main(int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    else:
        main()
