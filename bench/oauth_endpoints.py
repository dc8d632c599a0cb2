"""Throughput of the control plane's OAuth endpoints: the token endpoint (authorization-code
exchange, refresh) and introspection, as the ``oauth_endpoints`` section of ``python -m bench``.

One control plane (SQLite, as shipped) is pinned to the server CPUs; its process is the server
whose CPU is counted. Authorization codes are obtained beforehand through the real consent form
(bench.oauth_setup) and are not timed. A code works once and a refresh token works once (reuse
revokes the grant), so these rows use the closed-loop Python driver (bench.oauth_driver), one
refresh chain per client. Introspection repeats identical bytes, so it is measured twice: with
the same driver and with h2load (HTTP/1.1), which also cross-checks the driver."""

from __future__ import annotations

import collections
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import urlencode

import requests

from bench import h2load, oauth_driver
from bench.cases import HttpCase
from bench.cpu import pin_tree
from bench.oauth_setup import (
    FORM,
    INTROSPECT,
    TOKEN,
    Client,
    ControlPlaneProc,
    access_token,
    control_plane,
    mint_codes,
)
from bench.runner import NOISE_LIMIT, Settings, _CpuWindow, measure_case, wait_quiet
from bench.targets import RunningTarget, TargetEnv

SECTION = "oauth_endpoints"  # key of the rows in the results JSON
CLIENTS = 4  # concurrent driver clients, as h2load's -c 4 in the main table
# Enough codes to keep the exchange busy for ``duration`` s at up to this rate; minting them
# (through the consent form) costs about as long as redeeming them, untimed.
CODE_RATE_BUDGET = 400
# The fixed-rate (latency) run of the h2load introspection row; modest, as it shares one core
# with a Python HTTP server.
INTROSPECT_RATE = 100.0


@dataclass
class EndpointRow:
    """One row of the oauth_endpoints section."""

    endpoint: str  # "token: authorization_code" | "token: refresh_token" | "introspect"
    driver: str  # "python" (bench.oauth_driver) | "h2load"
    clients: int
    status: str = "ok"
    error: str | None = None
    requests: int = 0
    errors: int = 0
    elapsed_s: float | None = None
    rps: float | None = None
    latency_load: str = ""  # what the latencies were measured under
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    server_cpu_us_per_call: float | None = None
    client_cpu_us_per_call: float | None = None
    server_cpu_util: float | None = None
    client_cpu_util: float | None = None  # > ~0.8: the driver, not the server, may be the limit
    other_cpu_util: float | None = None
    steal_util: float | None = None
    busy_before: float | None = None  # busy cores just before the run (with --wait-quiet)


class _Repeat:
    """The same body every time (introspection)."""

    def __init__(self, body: str) -> None:
        self._body = body

    def first(self, worker: int) -> str | None:
        return self._body

    def next(self, worker: int, answer: bytes) -> str | None:
        if b'"active":true' not in answer:
            raise ValueError(f"token not active: {answer[:200]!r}")
        return self._body


class _Codes:
    """Pre-minted code exchanges, shared by all workers; keeps the refresh tokens issued."""

    def __init__(self, bodies: list[str]) -> None:
        self._bodies = collections.deque(bodies)
        self.refresh_tokens: list[str] = []

    def _pop(self) -> str | None:
        try:
            return self._bodies.popleft()  # atomic under the GIL
        except IndexError:
            return None

    def first(self, worker: int) -> str | None:
        return self._pop()

    def next(self, worker: int, answer: bytes) -> str | None:
        self.refresh_tokens.append(_field(answer, "refresh_token"))
        return self._pop()


class _RefreshChains:
    """One grant per worker: each refresh spends the token the previous one returned."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = tokens

    @staticmethod
    def _body(token: str) -> str:
        return urlencode({"grant_type": "refresh_token", "refresh_token": token})

    def first(self, worker: int) -> str | None:
        return self._body(self._tokens[worker])

    def next(self, worker: int, answer: bytes) -> str | None:
        self._tokens[worker] = _field(answer, "refresh_token")
        return self._body(self._tokens[worker])


def _field(answer: bytes, name: str) -> str:
    try:
        return str(json.loads(answer)[name])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"no {name} in {answer[:200]!r}") from exc


def _ms(values: list[int], fraction: float) -> float | None:
    return round(h2load.percentile(values, fraction) / 1000, 3) if values else None


def _drive(
    cp: ControlPlaneProc,
    client: Client,
    s: Settings,
    endpoint: str,
    path: str,
    feed: oauth_driver.Feed,
    clients: int,
    duration: float,
) -> EndpointRow:
    # With --wait-quiet, start only once others leave the CPUs idle (a run that spends codes
    # or refresh tokens cannot simply be repeated, so there is no retry as in the runner).
    busy_before = wait_quiet(NOISE_LIMIT, s.quiet_wait)
    windows: list[_CpuWindow] = []
    run = oauth_driver.run(
        cp.http,
        path,
        client.basic(),
        feed,
        clients=clients,
        duration=duration,
        cpus=set(s.client_cpus),
        on_start=lambda: windows.append(_CpuWindow([cp.pid])),
    )
    cpu = windows[0].close(run.driver_cpu_s, run.requests)
    lat = run.latencies_us
    row = EndpointRow(
        endpoint,
        "python",
        clients,
        requests=run.requests,
        errors=run.errors,
        elapsed_s=round(run.elapsed_s, 3),
        rps=round(run.requests / run.elapsed_s, 1) if run.elapsed_s else None,
        latency_load=f"closed loop, {clients} clients",
        p50_ms=_ms(lat, 0.5),
        p90_ms=_ms(lat, 0.9),
        p99_ms=_ms(lat, 0.99),
        max_ms=round(lat[-1] / 1000, 3) if lat else None,
        client_cpu_util=round(run.driver_cpu_s / run.elapsed_s, 3) if run.elapsed_s else None,
        busy_before=busy_before,
        **cpu,
    )
    if run.errors or not run.requests:
        row.status, row.error = "failed", run.first_error or "no request answered"
    return row


def _introspect_h2load(cp: ControlPlaneProc, client: Client, s: Settings, body: str) -> EndpointRow:
    headers = {"content-type": FORM, "authorization": client.basic()}
    case = HttpCase("introspect", headers, 200, path=INTROSPECT, body=body.encode(), http1=True)
    target = RunningTarget("oauth-introspect", f"http://{cp.http}", [case], [cp.pid])
    short = replace(
        s,
        reps=1,
        rate=min(s.rate, INTROSPECT_RATE),
        rate_duration=min(s.rate_duration, s.duration),
    )
    result = measure_case(target, case, short)
    sat, rate = result.saturation, result.fixed_rate
    row = EndpointRow(
        "introspect",
        "h2load",
        s.clients,
        status=result.status,
        error=result.error,
        requests=sum(r["requests"] for r in sat.get("reps", [])),
        errors=sat.get("unexpected", 0) + rate.get("unexpected", 0),
        rps=sat.get("rps"),
        latency_load=f"fixed {short.rate:g}/s",
        **{k: rate.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")},
        **{k: sat.get(k) for k in _CPU_KEYS},
        busy_before=(sat.get("reps") or [{}])[0].get("busy_before"),
    )
    if row.client_cpu_us_per_call is not None and row.rps is not None:
        row.client_cpu_util = round(row.client_cpu_us_per_call * row.rps / 1e6, 3)  # h2load's
    return row


_CPU_KEYS = (
    "server_cpu_us_per_call",
    "client_cpu_us_per_call",
    "server_cpu_util",
    "other_cpu_util",
    "steal_util",
)


def _check_introspection(cp: ControlPlaneProc, client: Client, body: str) -> None:
    resp = requests.post(
        cp.url(INTROSPECT),
        data=body,
        headers={"authorization": client.basic(), "content-type": FORM},
        timeout=10,
    )
    if resp.status_code != 200 or resp.json().get("active") is not True:
        raise RuntimeError(f"introspection of a live token: {resp.status_code} {resp.text[:200]}")


def _rows(cp: ControlPlaneProc, s: Settings) -> list[EndpointRow]:
    client, first = access_token(cp)
    duration = s.duration
    # A quick run mints just enough for the refresh chains: minting is the slow part.
    count = int(CODE_RATE_BUDGET * duration) if duration >= 1 else 3 * CLIENTS + 4
    print(f"  oauth: minting {count} authorization codes …", file=sys.stderr, flush=True)
    began = time.monotonic()
    codes = _Codes(mint_codes(cp, client, count))
    print(f"  oauth: minted in {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
    rows = [_drive(cp, client, s, "token: authorization_code", TOKEN, codes, CLIENTS, duration)]
    tokens = codes.refresh_tokens
    for clients in (CLIENTS, 2 * CLIENTS):  # 2x no faster: the driver is not the limit
        if len(tokens) < clients:
            error = "not enough refresh tokens from the exchange run"
            rows.append(EndpointRow("token: refresh_token", "python", clients, "failed", error))
            continue
        chains = _RefreshChains(tokens[:clients])
        tokens = tokens[clients:]
        rows.append(_drive(cp, client, s, "token: refresh_token", TOKEN, chains, clients, duration))
    body = urlencode({"token": str(first["access_token"])})
    _check_introspection(cp, client, body)
    rows.append(_drive(cp, client, s, "introspect", INTROSPECT, _Repeat(body), CLIENTS, duration))
    rows.append(_introspect_h2load(cp, client, s, body))
    return rows


def run(s: Settings) -> dict[str, Any]:
    """Measure every endpoint row; a failure becomes a failed row, never an exception.

    Returns the JSON section: ``ok`` (every row ok), ``server`` (what was measured) and
    ``rows``."""
    print("oauth endpoints", file=sys.stderr, flush=True)
    env = TargetEnv(s.server_cpus, s.workdir)
    try:
        with control_plane(env, "oauth-control-plane", pin=True) as cp:
            pin_tree([cp.pid], set(s.server_cpus))
            rows = _rows(cp, s)
    except Exception as exc:  # the main table must survive a broken section
        rows = [EndpointRow("(setup)", "-", 0, "failed", f"{type(exc).__name__}: {exc}")]
    return {
        "ok": all(r.status == "ok" for r in rows),
        "server": "spauth control-plane (uvicorn, SQLite store), one process on the server CPUs",
        "rows": [asdict(r) for r in rows],
    }


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(section: dict[str, Any]) -> str:
    """The section as a fixed-width table."""
    rows: list[dict[str, Any]] = section["rows"]
    head = (
        f"{'oauth endpoint':<26} {'driver':<7} {'c':>2} {'req/s':>7} {'p50ms':>7} {'p99ms':>7} "
        f"{'srv us/call':>11} {'cli us/call':>11} {'srv cpu':>7} {'noise':>5}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['endpoint']:<26.26} {r['driver']:<7} {r['clients']:>2} {_fmt(r['rps'], '7.0f')} "
            f"{_fmt(r['p50_ms'], '7.2f')} {_fmt(r['p99_ms'], '7.2f')} "
            f"{_fmt(r['server_cpu_us_per_call'], '11.0f')} "
            f"{_fmt(r['client_cpu_us_per_call'], '11.0f')} "
            f"{_fmt(r['server_cpu_util'], '7.2f')} {_fmt(r['other_cpu_util'], '5.2f')}  "
            + (r["status"] if r["error"] is None else f"{r['status']}: {r['error']}")
        )
    if any((r["other_cpu_util"] or 0) > NOISE_LIMIT for r in rows):
        lines.append("WARNING: other processes used CPU during some oauth rows ('noise').")
    if any(_delayed_ack_stall(r) for r in rows):
        lines.append(
            "WARNING: p50 ≈ 40 ms with an idle server is the Nagle/delayed-ACK stall: the HTTP "
            "server's sockets lack TCP_NODELAY (uvicorn writes headers and body separately)."
        )
    return "\n".join(lines)


def _delayed_ack_stall(row: dict[str, Any]) -> bool:
    # Linux delays an ACK by ~40 ms; a server without TCP_NODELAY holds the response body until
    # the ACK of its headers arrives, so every keep-alive request waits that long.
    p50, util = row["p50_ms"], row["server_cpu_util"]
    return p50 is not None and util is not None and 38 <= p50 <= 50 and util < 0.5
