"""Revocation propagation between real processes: time from ``RevokeApiKey`` returning to each of
three ``spauth sidecar`` processes denying the key, measured by ``python -m bench``.

Scenarios (each with its own processes, started fresh):

* ``one-control-plane`` — one ``spauth control-plane``, three sidecars on its replication
  stream (the default set-up: no Redis). The commit wakes the streams in the same process.
* ``two-replicas+redis`` — two control planes on one SQLite file with ``--redis-url`` (the change
  bus), sidecars s0 and s1 on replica B, s2 on replica A; keys are revoked on A, so B's sidecars
  hear of it through Redis → B re-reads the change log → their streams.
* ``two-replicas-no-bus`` — the same without Redis: B's sidecars wait for B's next heartbeat
  re-read of the change log (``sync_heartbeat``, 1 s), which bounds the delay.

Method: mint K keys (each with its own source address in the CheckRequest, so the failed-
credential limits never turn a deny into a 429 that hides the revocation), wait until every
sidecar allows every key, then for each key: pause a random time (up to the heartbeat for the
no-bus scenario, so revocations fall at random points of B's cycle; up to 50 ms otherwise),
call RevokeApiKey over the admin gRPC API and, from the moment it returns, poll each sidecar's
Check (a real gRPC CheckRequest, one thread per sidecar, ``POLL_INTERVAL`` between calls) until
it denies. A delay is measured to the arrival of the first deny, so it includes one Check round
trip (~0.3-1 ms here) and up to one poll interval. Reported over all (key, sidecar) pairs:
p50/p99/max (nearest rank: with 60 pairs p99 is the largest but one).

Alone: ``python -m bench.propagation [--keys 20]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2

from bench.cases import CHECK_METHOD, check_request, typical_headers
from bench.cpu import taskset_prefix
from bench.h2load import percentile
from bench.sidecar_target import CHECKS, _admin_up, _serving
from bench.targets import SERVER_ENV, TargetEnv, TargetError, _stop, _tail
from sidecar.devtools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
POLL_INTERVAL = 0.001  # seconds between two Checks of one sidecar while waiting for the deny
SMALL_JITTER = 0.05  # max random pause before a revocation when no heartbeat is involved
TIMEOUT = 15.0  # a sidecar that still allows a revoked key after this fails the scenario
SIDECARS = 3


@dataclass(frozen=True)
class Scenario:
    """One topology: ``replicas`` control planes (1 or 2), with or without the Redis bus."""

    name: str
    replicas: int
    redis: bool
    keys: int
    jitter: float  # max random pause before each revocation, seconds


def scenarios(keys: int, heartbeat: float) -> list[Scenario]:
    """The three scenarios; the heartbeat-bound one uses half the keys (it costs ~1 s a key)."""
    return [
        Scenario("one-control-plane", 1, False, keys, SMALL_JITTER),
        Scenario("two-replicas+redis", 2, True, keys, SMALL_JITTER),
        Scenario("two-replicas-no-bus", 2, False, max(1, keys // 2), heartbeat),
    ]


def _all_cpus() -> set[int]:
    # `python -m bench` narrows its own affinity to the client CPUs; these processes get all.
    return set(range(os.cpu_count() or 1))


def _spawn(workdir: Path, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
    with (workdir / f"{name}.log").open("wb") as sink:
        return subprocess.Popen(
            [*taskset_prefix(_all_cpus()), *argv],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVER_ENV},
            cwd=ROOT,
            start_new_session=True,
        )


def _stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM everything first, then wait for each: the drains overlap instead of adding up."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        _stop(proc)


def _wait(what: str, ready: Any, procs: Sequence[subprocess.Popen[bytes]], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise TargetError(f"{what} did not start:\n{_tail(log)}")
        time.sleep(0.05)


@contextlib.contextmanager
def _topology(sc: Scenario, env: TargetEnv, redis_url: str) -> Iterator[tuple[str, str, list[str]]]:
    """Start the control planes and sidecars; yield (admin of A, operator key, sidecar addrs)."""
    work = env.workdir / sc.name
    work.mkdir(parents=True)
    data = work / "data"  # shared by both replicas
    bus = ["--redis-url", redis_url] if redis_url else []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        admins: list[str] = []
        for label in "AB"[: sc.replicas]:
            admin = f"127.0.0.1:{env.free_port()}"
            http = f"127.0.0.1:{env.free_port()}"
            argv = [env.python, "-m", "sidecar", "control-plane", "--data-dir", str(data),
                    "--admin-addr", admin, "--http-addr", http, *bus]  # fmt: skip
            procs.append(_spawn(work, f"control-plane-{label}", argv))
            admins.append(admin)
            if label == "A":  # A mints the operator key; B starts after that and finds it
                log = work / "control-plane-A.log"
                _wait("control plane A", lambda a=admin: _admin_up(a), procs, log)
        operator = (data / "bootstrap-key").read_text().strip()
        # Two replicas: s0, s1 on B, s2 on A (revocations happen on A).
        homes = [admins[-1], admins[-1], admins[0]]
        addrs = []
        for i, home in enumerate(homes):
            listen = f"127.0.0.1:{env.free_port()}"
            argv = [env.python, "-m", "sidecar", "sidecar", "--listen", listen,
                    "--control-plane", home, "--state-dir", str(work / f"s{i}"),
                    "--metrics-addr", "", "--sync-token-file", str(data / "sync-token"),
                    *bus]  # fmt: skip
            procs.append(_spawn(work, f"sidecar-{i}", argv))
            addrs.append(listen)
        # Sidecars start while B does (they retry until it answers): starts overlap.
        if sc.replicas == 2:
            log = work / "control-plane-B.log"
            _wait("control plane B", lambda a=admins[1]: _admin_up(a), procs, log)
        for i, listen in enumerate(addrs):
            _wait(f"sidecar {i}", lambda a=listen: _serving(a), procs, work / f"sidecar-{i}.log")
        yield admins[0], operator, addrs
    finally:
        _stop_all(procs)


def _request(secret: str, source: int) -> bytes:
    """A Check for ``secret`` from source address number ``source`` (see the module docstring)."""
    req = external_auth_pb2.CheckRequest.FromString(
        check_request(typical_headers(x_api_key=secret), path=CHECKS)
    )
    address = f"10.{source >> 16 & 255}.{source >> 8 & 255}.{source & 255}"
    req.attributes.source.address.socket_address.address = address
    data: bytes = req.SerializeToString()
    return data


def _until_allowed(check: Check, secret: str, sources: Iterator[int]) -> None:
    """Wait until a sidecar has the key. Before it does, each try is an unknown key — a failed
    credential — so every try comes from a new source address, or the per-source limit would
    block the address (429) and hide the allow."""
    deadline = time.monotonic() + TIMEOUT
    while _code(check, _request(secret, next(sources))) != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"key not allowed after {TIMEOUT:g} s")
        time.sleep(0.01)


Check = Any  # a grpc UnaryUnaryMultiCallable: bytes -> CheckResponse


def _code(check: Check, request: bytes) -> int:
    code: int = check(request, timeout=5).status.code
    return code


def _until_denied(check: Check, request: bytes, start: float) -> tuple[float, int]:
    """Poll until the answer is a deny; (seconds since ``start``, status code)."""
    while True:
        code = _code(check, request)
        now = time.monotonic()
        if code != 0:
            return now - start, code
        if now - start > TIMEOUT:
            raise TimeoutError(f"revoked key still allowed after {TIMEOUT:g} s")
        time.sleep(POLL_INTERVAL)


def _measure(sc: Scenario, admin: str, operator: str, addrs: list[str]) -> dict[str, Any]:
    from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
    from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as pb_grpc

    meta = (("authorization", f"Bearer {operator}"),)
    with contextlib.ExitStack() as stack:
        admin_channel = stack.enter_context(grpc.insecure_channel(admin))
        stub = pb_grpc.ApiKeyServiceStub(admin_channel)
        checks = []
        for addr in addrs:
            channel = stack.enter_context(grpc.insecure_channel(addr))
            checks.append(
                channel.unary_unary(
                    CHECK_METHOD,
                    request_serializer=None,
                    response_deserializer=external_auth_pb2.CheckResponse.FromString,
                )
            )
        keys, sources = [], itertools.count(1 << 16)
        for i in range(sc.keys):
            scopes = ["checks:read"]
            create = pb.CreateApiKeyRequest(workspace="acme", name=f"prop{i}", scopes=scopes)
            resp = stub.CreateApiKey(create, metadata=meta, timeout=10)
            keys.append((resp.api_key.id, resp.key, _request(resp.key, i + 1)))
        pool = stack.enter_context(ThreadPoolExecutor(len(checks)))
        for _, secret, _ in keys:  # every sidecar has every key before any is revoked
            for check in checks:
                _until_allowed(check, secret, sources)
        delays: list[list[float]] = [[] for _ in checks]
        codes: dict[str, int] = {}
        for key_id, _, request in keys:
            time.sleep(random.uniform(0, sc.jitter))
            stub.RevokeApiKey(pb.RevokeApiKeyRequest(id=key_id), metadata=meta, timeout=10)
            returned = time.monotonic()
            futures = [pool.submit(_until_denied, c, request, returned) for c in checks]
            for i, future in enumerate(futures):
                delay, code = future.result()
                delays[i].append(delay)
                codes[str(code)] = codes.get(str(code), 0) + 1
    homes = ["B", "B", "A"] if sc.replicas == 2 else ["A"] * len(addrs)
    return {
        **_stats([d for per in delays for d in per]),
        "deny_codes": codes,  # 16 = UNAUTHENTICATED (revoked_credential)
        "per_sidecar": [
            {"sidecar": f"s{i}", "control_plane": homes[i], **_stats(per)}
            for i, per in enumerate(delays)
        ],
        # With two replicas the all-pairs figures mix two paths: A's sidecars are woken by the
        # commit itself, B's by the bus or the heartbeat. Per replica tells them apart.
        "by_control_plane": {
            home: _stats([d for i, per in enumerate(delays) if homes[i] == home for d in per])
            for home in sorted(set(homes))
        },
    }


def _stats(delays: list[float]) -> dict[str, Any]:
    ms = sorted(d * 1000 for d in delays)
    return {
        "pairs": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),  # type: ignore[arg-type]
        "max_ms": round(ms[-1], 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def run_scenario(sc: Scenario, env: TargetEnv, heartbeat: float) -> dict[str, Any]:
    """Start one topology, measure it, stop it; failures and a missing redis-server are rows."""
    row: dict[str, Any] = {
        "scenario": sc.name,
        "control_planes": sc.replicas,
        "redis": sc.redis,
        "sidecars": SIDECARS,
        "keys": sc.keys,
        "max_pause_s": sc.jitter,
        "sync_heartbeat_s": heartbeat,
    }
    print(f"propagation {sc.name} …", file=sys.stderr, flush=True)
    try:
        with contextlib.ExitStack() as stack:
            url = ""
            if sc.redis:
                if shutil.which("redis-server") is None:
                    return {**row, "status": "skipped", "error": "skipped: redis-server not found"}
                url = stack.enter_context(RedisServer()).url
            started = time.monotonic()
            admin, operator, addrs = stack.enter_context(_topology(sc, env, url))
            row["startup_s"] = round(time.monotonic() - started, 2)
            measured = _measure(sc, admin, operator, addrs)
            row["measure_s"] = round(time.monotonic() - started - row["startup_s"], 2)
            return {**row, "status": "ok", "error": None, **measured}
    except (TargetError, TimeoutError, grpc.RpcError, OSError, RuntimeError) as exc:
        return {**row, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def run(workdir: Path, keys: int) -> dict[str, Any]:
    """Every scenario, as the ``propagation`` section of the results document."""
    from sidecar.config import Settings

    heartbeat = Settings().sync_heartbeat
    env = TargetEnv(frozenset(_all_cpus()), workdir)
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _all_cpus())  # the polling threads inherit it
    try:
        rows = [run_scenario(sc, env, heartbeat) for sc in scenarios(keys, heartbeat)]
    finally:
        os.sched_setaffinity(0, saved)
    return {
        "method": "RevokeApiKey returned → each sidecar's Check denies (real processes)",
        "poll_interval_ms": POLL_INTERVAL * 1000,
        "ok": all(r["status"] != "failed" for r in rows),
        "scenarios": rows,
    }


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(section: dict[str, Any]) -> str:
    """The printed propagation table."""
    head = (
        f"{'propagation scenario':<28} {'cps':>3} {'redis':>5} {'pairs':>5} {'p50ms':>8} "
        f"{'p99ms':>8} {'maxms':>8}  status"
    )
    lines = [
        f"revocation propagation (poll every {section['poll_interval_ms']:g} ms)",
        head,
        "-" * len(head),
    ]
    for r in section["scenarios"]:
        lines.append(
            f"{r['scenario']:<28.28} {r['control_planes']:>3} {'yes' if r['redis'] else 'no':>5} "
            f"{_fmt(r.get('pairs'), '5d')} {_fmt(r.get('p50_ms'), '8.1f')} "
            f"{_fmt(r.get('p99_ms'), '8.1f')} {_fmt(r.get('max_ms'), '8.1f')}  "
            + (r["status"] if not r.get("error") else f"{r['status']}: {r['error']}")
        )
        by_home = r.get("by_control_plane", {})
        for home, st in by_home.items() if len(by_home) > 1 else ():
            lines.append(
                f"{'  sidecars on ' + home:<28} {'':>3} {'':>5} {st['pairs']:>5d} "
                f"{st['p50_ms']:>8.1f} {st['p99_ms']:>8.1f} {st['max_ms']:>8.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=20, help="keys revoked per scenario (20)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="spauth-prop-") as tmp:
        section = run(Path(tmp), args.keys)
    print(table(section))
    print(json.dumps(section, indent=2), file=sys.stderr)
    return 0 if section["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
