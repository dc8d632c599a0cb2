"""Audit ingest cost: the control plane's CPU per decision record, on SQLite and on PostgreSQL.

    python -m bench.ingest                       # 20,000 records per backend, both backends
    python -m bench.ingest --records 50000 --backend sqlite --json out.json
    python -m bench.ingest --control-plane-src /tmp/main   # A/B: another checkout's control plane
    python -m bench.ingest --backend sqlite --ids random --ids time-ordered --repeat 3

A real control plane (``python -m sidecar control-plane``, its own process) receives realistic
decision records (8 workspaces plus the no-workspace chain, allows and denials with their reasons,
paths, sources and latencies) from the sidecar's own client (``GrpcTransport``: IngestAuditRecords,
2,000 records per call in messages of 500, the shipper's defaults), so decoding, validation, chain
hashing and SQL are all counted. CPU comes from ``/proc/<pid>/stat`` (utime + stime of every
thread): the control plane's, and PostgreSQL's server processes' on their own line, since a shared
database runs on other hosts. The run ends by verifying every chain through the admin API, so a
path that stored nothing (or broke a chain) cannot report a good number.

Reported per backend: records/s per control-plane core (records / control-plane CPU seconds),
control-plane CPU µs per record, database-server CPU µs per record (PostgreSQL), wall records/s,
and the control plane's idle CPU (its timers, measured for 2 s before sending; included in the
per-record figure, which is therefore a slight overestimate).
Needs only the ``bench`` extra and, for PostgreSQL, the server binaries (``make system-deps``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.cpu import descendants, process_cpu_seconds
from bench.sidecar_target import _admin_up
from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import audit_pb2_grpc as pb_grpc
from sidecar.auditship.codec import encode
from sidecar.auditship.records import PendingDecision, decision_event
from sidecar.auditship.transport import GrpcTransport
from sidecar.authz.decision import Decision, DecisionIds, Identity, Reason
from sidecar.devtools.ports import free_port

_ROOT = Path(__file__).resolve().parent.parent
WORKSPACES = ("acme", "globex", "initech", "umbrella", "hooli", "wayne", "stark", "tyrell", "")
DENIALS = ("insufficient_scope", "unknown_credential", "revoked_credential", "rate_limited")
SHIP_BATCH = 2000  # records per IngestAuditRecords call: the shipper's default batch
IDLE_S = 2.0


@dataclass(frozen=True, slots=True)
class IngestRow:
    backend: str
    records: int
    wall_s: float
    control_plane_cpu_s: float
    database_cpu_s: float
    control_plane_idle_util: float
    source: str
    ids: str = "time-ordered"
    shape: str = "mix"

    @property
    def records_per_core_s(self) -> float:
        return self.records / self.control_plane_cpu_s if self.control_plane_cpu_s else 0.0

    @property
    def control_plane_us_per_record(self) -> float:
        return self.control_plane_cpu_s / self.records * 1e6

    @property
    def database_us_per_record(self) -> float:
        return self.database_cpu_s / self.records * 1e6

    def as_json(self) -> dict[str, object]:
        return {
            **asdict(self),
            "records_per_core_s": round(self.records_per_core_s),
            "control_plane_us_per_record": round(self.control_plane_us_per_record, 1),
            "database_us_per_record": round(self.database_us_per_record, 1),
        }


ID_FORMATS = ("time-ordered", "random", "sequential")


class _RecordClock:
    """The time of the record being made (a Clock for ``DecisionIds``)."""

    def __init__(self) -> None:
        self.at = 0.0

    def now(self) -> float:
        return self.at


def records(
    count: int, start: int, now: float, *, ids: str = "time-ordered", shape: str = "mix"
) -> list[bytes]:
    """Spool payloads as a loaded sidecar writes them: mostly allows, every fourth a denial,
    each 10 µs after the one before across calls, as a fleet's decisions arrive (times that
    restarted with every call made SQLite insert each batch all over its time indexes, a cost
    that grew with the table: 16 → 46 µs per row from 50,000 to 200,000 rows, against a flat
    10 µs with increasing times). Decision ids (``ids``, one of ``ID_FORMATS``):
    ``time-ordered`` as a sidecar makes them now (its own ``DecisionIds`` at the record's time,
    random bits seeded by ``start`` so runs repeat); ``random``, ``dec_`` and 96 random-looking
    bits, as a sidecar made them before 2026-12-07; ``sequential`` numbers them in order, as
    this bench did before that. ``shape`` (one of ``SHAPES``): ``mix`` as above, or every
    record one kind of decision as the sidecar's own record builder ships it (``_shaped``)."""
    clock = _RecordClock()
    made = DecisionIds(random.Random(start).randbytes, clock)
    out = []
    for i in range(start, start + count):
        clock.at = now - 2.0 + (i % 10**7) * 1e-5
        if ids == "time-ordered":
            did = made.next()
        else:
            did = f"dec_{_id_bits(i) if ids == 'random' else i:024x}"
        out.append(_mixed(i, did, clock.at) if shape == "mix" else _shaped(shape, i, did, clock.at))
    return out


def _mixed(i: int, did: str, at: float) -> bytes:
    """The ``mix`` shape's record ``i``: allows and every fourth a denial, over 8 workspaces
    and the no-workspace chain, built as an ``AuditEvent`` (this bench's records before
    ``--shape``; its figures in docs/performance.md are of these)."""
    workspace = WORKSPACES[i % len(WORKSPACES)]
    allowed = i % 4 != 0
    ev = decision_event(
        time=at,
        allowed=allowed,
        reason="ok" if allowed else DENIALS[i // 4 % len(DENIALS)],
        credential_id=f"key_{(i * 7919) % 400:016x}" if i % 13 else "",
        workspace=workspace,
        method=("GET", "POST", "DELETE")[i % 3],
        path=f"/v1/workspaces/{workspace or 'x'}/checks/{i % 211}?page={i % 5}",
        source=f"10.{i % 7}.{i % 251}.{i % 199}:{40000 + i % 20000}",
        decision_id=did,
        latency_s=(40 + i % 300) * 1e-6,
    )
    return encode(ev)


SHAPES = ("mix", "allow", "unknown-key", "wrong-scope", "token")
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _token(seed: int, n: int) -> str:
    """``n`` base-62 characters, a function of ``seed``: a minted id's random part."""
    rng = random.Random(seed)
    return "".join(rng.choice(_B62) for _ in range(n))


# What a sidecar's replica holds: 400 API keys over the 8 workspaces, and 50 access tokens
# (RFC 9068: the jti is the credential id, the subject the actor, the client alongside).
_KEYS = tuple(
    Identity("api_key", "key_" + _token(k, 16), WORKSPACES[k % 8], frozenset({"checks:read"}), 0)
    for k in range(400)
)


def _access_token(k: int) -> Identity:
    return Identity(
        "access_token",
        "at_" + _token(10**6 + k, 22),
        WORKSPACES[k % 8],
        frozenset({"checks:read"}),
        0,
        subject="usr_" + _token(2 * 10**6 + k, 16),
        client_id="app_" + _token(3 * 10**6 + k, 16),
        grant_id="grt_" + _token(4 * 10**6 + k, 16),
    )


_TOKENS = tuple(_access_token(k) for k in range(50))
_SHAPE_DECISION = {
    "allow": (Reason.OK, _KEYS),
    "unknown-key": (Reason.UNKNOWN_CREDENTIAL, ()),
    "wrong-scope": (Reason.INSUFFICIENT_SCOPE, _KEYS),
    "token": (Reason.OK, _TOKENS),
}


def _shaped(shape: str, i: int, did: str, at: float) -> bytes:
    """Record ``i`` of ``shape`` as the sidecar ships it (``PendingDecision.payload``, the
    bytes its writer thread spools): an allow or a wrong scope by one of 400 keys, an unknown
    key's denial (no identity: actor ``anonymous``, the no-workspace chain), or an allow by
    one of 50 access tokens."""
    reason, identities = _SHAPE_DECISION[shape]
    identity = identities[(i * 7919) % len(identities)] if identities else None
    workspace = identity.workspace if identity else "x"
    return PendingDecision(
        Decision(reason, did, identity),
        method=("GET", "POST", "DELETE")[i % 3],
        path=f"/v1/workspaces/{workspace}/checks/{i % 211}?page={i % 5}",
        source=f"10.{i % 7}.{i % 251}.{i % 199}:{40000 + i % 20000}",
        latency_s=(40 + i % 300) * 1e-6,
        time=at,
    ).payload()


def _id_bits(i: int) -> int:
    """96 bits that look random, a function of ``i`` (so runs repeat): the former decision ids
    were ``dec_`` and 96 random bits, so each landed at a random place in the id index."""
    return int.from_bytes(hashlib.blake2b(i.to_bytes(8, "big"), digest_size=12).digest(), "big")


@contextlib.contextmanager
def control_plane(
    data: Path, env: Mapping[str, str], source: Path = _ROOT
) -> Iterator[tuple[str, int, str, str]]:
    """``python -m sidecar control-plane`` from the checkout ``source``, on free ports: (admin
    address, pid, sync token, operator key)."""
    admin = f"127.0.0.1:{free_port()}"
    http = f"127.0.0.1:{free_port()}"
    log = (data.parent / f"{data.name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "control-plane", "--data-dir", str(data),
         "--admin-addr", admin, "--http-addr", http],
        stdout=log, stderr=subprocess.STDOUT, cwd=source, env={**os.environ, **env},
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        key_file, token_file = data / "bootstrap-key", data / "sync-token"
        while not (key_file.exists() and token_file.exists() and _admin_up(admin)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"control plane did not start; see {log.name}")
            time.sleep(0.1)
        token, operator = token_file.read_text().strip(), key_file.read_text().strip()
        yield admin, proc.pid, token, operator
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def _verify(admin: str, operator: str) -> int:
    """Every chain through VerifyAuditChain; returns the records checked. Raises if one is
    broken."""
    with grpc.insecure_channel(admin) as channel:
        resp = pb_grpc.AuditServiceStub(channel).VerifyAuditChain(
            pb.VerifyAuditChainRequest(),
            metadata=(("authorization", f"Bearer {operator}"),),
            timeout=120,
        )
    broken = [c.workspace for c in resp.chains if c.HasField("first_break")]
    if broken:
        raise RuntimeError(f"chains broken after ingest: {broken}")
    return sum(c.records_checked for c in resp.chains)


def measure(
    backend: str,
    data: Path,
    env: Mapping[str, str],
    count: int,
    db_pids: list[int],
    source: Path = _ROOT,
    *,
    ids: str = "time-ordered",
    shape: str = "mix",
) -> IngestRow:
    """Warm up with two calls, then ship ``count`` records and take the CPU they cost."""
    now = time.time()
    made = [
        records(SHIP_BATCH, start, now, ids=ids, shape=shape)
        for start in [10**12, 10**12 + SHIP_BATCH, *range(0, count, SHIP_BATCH)]
    ]
    warm, batches = made[:2], made[2:]
    with control_plane(data, env, source) as (admin, pid, token, operator):
        transport = GrpcTransport(admin, token, timeout=120)
        try:
            for batch in warm:
                transport.send(batch)
            idle0 = process_cpu_seconds(pid)
            time.sleep(IDLE_S)
            idle = (process_cpu_seconds(pid) - idle0) / IDLE_S
            cp0, db0, t0 = process_cpu_seconds(pid), _cpu(db_pids), time.perf_counter()
            for batch in batches:
                acked = transport.send(batch)
                if acked != len(batch):
                    raise RuntimeError(f"{len(batch) - acked} records not acknowledged")
            wall = time.perf_counter() - t0
            cp, db = process_cpu_seconds(pid) - cp0, _cpu(db_pids) - db0
        finally:
            transport.close()
        checked = _verify(admin, operator)
    sent = sum(len(b) for b in batches)
    if checked < sent:
        raise RuntimeError(f"only {checked} of {sent} records are in the verified chains")
    return IngestRow(backend, sent, wall, cp, db, idle, str(source), ids, shape)


def _cpu(pids: list[int]) -> float:
    return sum(process_cpu_seconds(p) for root in pids for p in descendants(root))


def run_sqlite(
    workdir: Path, count: int, source: Path, ids: str = "time-ordered", shape: str = "mix"
) -> IngestRow:
    return measure("sqlite", workdir / "sqlite", {}, count, [], source, ids=ids, shape=shape)


def run_postgres(
    workdir: Path, count: int, source: Path, ids: str = "time-ordered", shape: str = "mix"
) -> IngestRow:
    from sidecar.core import kek
    from sidecar.devtools.postgres_server import PostgresServer

    with PostgresServer() as pg:
        url = pg.create_database("ingest")
        postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
        env = {"SPAUTH_DATABASE_URL": url, "SPAUTH_KEY_ENCRYPTION_KEY": kek.generate()}
        return measure(
            "postgres", workdir / "postgres", env, count, [postmaster], source,
            ids=ids, shape=shape,
        )  # fmt: skip


def table(rows: list[IngestRow]) -> str:
    lines = [
        "| backend | shape | ids | records | records/s per control-plane core "
        "| control-plane CPU µs/record | database CPU µs/record | wall records/s "
        "| idle control-plane CPU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        db = f"{r.database_us_per_record:.1f}" if r.backend == "postgres" else "(in process)"
        lines.append(
            f"| {r.backend} | {r.shape} | {r.ids} | {r.records:,} | {r.records_per_core_s:,.0f} "
            f"| {r.control_plane_us_per_record:.1f} | {db} | {r.records / r.wall_s:,.0f} "
            f"| {r.control_plane_idle_util:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    parser.add_argument("--records", type=int, default=20_000, help="measured records per backend")
    parser.add_argument(
        "--backend", action="append", choices=["sqlite", "postgres"], help="default: both"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--control-plane-src",
        type=Path,
        default=_ROOT,
        help="run the control plane from this checkout (A/B against another commit)",
    )
    parser.add_argument(
        "--ids",
        action="append",
        choices=ID_FORMATS,
        help="decision ids: time-ordered (a sidecar's now, the default), random (a sidecar's "
        "before 2026-12-07) or sequential; repeat the flag for an A/B in one run",
    )
    parser.add_argument(
        "--shape",
        action="append",
        choices=SHAPES,
        help="the records: mix (allows, every fourth a denial; the default), or all allows by "
        "API keys, unknown-key denials, wrong-scope denials or allows by access tokens, as the "
        "sidecar ships each; repeat the flag to compare them in one run",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every backend, id format and shape this many times",
    )
    args = parser.parse_args(argv)
    src = args.control_plane_src.resolve()
    shapes = args.shape or ["mix"]
    rows: list[IngestRow] = []
    with tempfile.TemporaryDirectory(prefix="spauth-ingest-") as tmp:
        for _ in range(args.repeat):
            for backend in args.backend or ["sqlite", "postgres"]:
                run = run_sqlite if backend == "sqlite" else run_postgres
                for ids, shape in itertools.product(args.ids or ["time-ordered"], shapes):
                    workdir = Path(tmp) / str(len(rows))  # each run starts from an empty store
                    workdir.mkdir()
                    rows.append(run(workdir, args.records, src, ids, shape))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([r.as_json() for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
