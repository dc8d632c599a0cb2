"""A cold RS256 access token on the Check path, in process (docs/performance.md, "Cold tokens"):

    python -m bench.cold_token [RUNS]     # thread CPU µs per call, best of RUNS runs (15)
    python bench/cold_token.py            # the same, for whatever sidecar is first on sys.path

Each row is the thread CPU of one call (not wall time: on a shared box the neighbours then
matter less), best of the runs. The check rows go through the sidecar's handlers with its
observers as shipped (metrics, denial log, decision records, usage), a spool write after every
60 checks (not timed), and the request of the bench's ``sidecar-jwt-nocache`` row: a 737-byte
token in ``typical_headers`` (1,264 bytes), the engine's token cache off
(``token_cache_size = 0``), so every check verifies the token. The API-key rows are the same
request with a key instead, for what is token-specific; the expired-token rows a refused token
(its signature good) sent again and again, which both paths answer in Python. Run as a script
with another tree first on ``PYTHONPATH`` to compare two trees in one session."""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: not bench/ first (its envoy.py), the
    # repository of this file last (after PYTHONPATH: the tree being measured)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    sys.path.append(sys.path.pop(0))

ISSUER = "http://127.0.0.1:8080"
AUDIENCE = "statuspulse-api"
PATH = "/v1/workspaces/acme/checks"
HOST = "api.statuspulse.test"


def _cpu_us(call: Callable[[], object], flush: Callable[[], object], runs: int) -> float:
    """Thread CPU µs per call: best of ``runs`` runs of 5 batches of 60 calls, ``flush`` after
    each batch (not timed)."""
    best = float("inf")
    for _ in range(runs):
        spent = 0.0
        for _ in range(5):
            started = time.thread_time()
            for _ in range(60):
                call()
            spent += time.thread_time() - started
            flush()
        best = min(best, spent / 300 * 1e6)
    return best


def rows() -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """(call, flush) per row name."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from bench.cached_token import issue_token
    from bench.cases import check_request, typical_headers
    from bench.overhead import key_change
    from sidecar.auditship import AuditPipeline, ShipConfig
    from sidecar.auditship.observer import DecisionRecorder
    from sidecar.authz.engine import Engine
    from sidecar.authz.policy_source import load_policy
    from sidecar.authz.replica import Replica
    from sidecar.authz.token_verifier import ReplicaTokenVerifier
    from sidecar.core import keyformat
    from sidecar.core.changes import signing_key_upserted
    from sidecar.core.clock import SystemClock
    from sidecar.dataplane.envoy_check import CheckHandler
    from sidecar.dataplane.fastcheck import FastCheckHandler
    from sidecar.ops.denial_log import DenialLog
    from sidecar.ops.metrics import DecisionMetrics, Metrics
    from sidecar.usage import UsageTally

    logging.getLogger().handlers[:] = [logging.NullHandler()]
    key, private, token = issue_token(time.time())
    secret = keyformat.mint_key()
    clock = SystemClock()

    def handler(credential: str) -> tuple[Any, Any, Any]:
        replica = Replica()
        replica.load_snapshot(1, [signing_key_upserted(key), key_change(secret)])
        verifier = ReplicaTokenVerifier(ISSUER, AUDIENCE, max_lifetime=3600)
        engine = Engine(
            replica, load_policy(None), clock, token_verifier=verifier, token_cache_size=0
        )
        pipeline = AuditPipeline(ShipConfig(Path(tempfile.mkdtemp())), None)
        observers: list[Any] = [DecisionMetrics(Metrics()), DenialLog(100.0)]
        observers += [DecisionRecorder(pipeline, clock), UsageTally(clock.now)]
        data = check_request(
            typical_headers(authorization=f"Bearer {credential}"), path=PATH, host=HOST
        )
        return CheckHandler(engine, observers), pipeline, data

    out: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
    public = private.public_key()
    head, payload, signature = token.split(".")
    signed, sig = f"{head}.{payload}".encode(), rfc9068_signature(signature)
    out["raw RSA-2048 verify"] = (
        lambda: public.verify(sig, signed, padding.PKCS1v15(), hashes.SHA256()),
        lambda: None,
    )
    engine = handler(token)[0].engine
    verifier, replica = engine.token_verifier, engine.replica
    out["ReplicaTokenVerifier"] = (lambda: verifier(token, replica, time.time()), lambda: None)
    # Each credential through both paths. The expired token (its signature good) is sent again
    # and again: the Python path answers it on both paths, so its compiled row is what the
    # compiled path adds in front of that answer.
    credentials = (
        ("cold token", token),
        ("expired token", _expired_token(key.kid, private)),
        ("API key", secret),
    )
    for label, credential in credentials:
        for name, make in (("python", lambda h: h), ("compiled", FastCheckHandler)):
            checking, pipeline, data = handler(credential)
            out[f"{label}, {name} path"] = (
                _data_call(make(checking), data, name == "python"),
                functools.partial(pipeline.flush, sync=False),
            )
    from envoy.service.auth.v3.external_auth_pb2 import CheckResponse

    for name, (call, _) in out.items():  # every check row is an allow but the expired one
        if "path" in name:
            answer = call()
            assert isinstance(answer, bytes), name
            assert (CheckResponse.FromString(answer).status.code == 0) != ("expired" in name)
    return out


def _data_call(answer: Any, data: bytes, python: bool) -> Callable[[], object]:
    from sidecar.dataplane.envoy_check import parse_check_request

    if python:
        return lambda: answer(parse_check_request(data), None)
    return lambda: answer(data, None)


def _expired_token(kid: str, private: Any) -> str:
    """An access token of the bench's signing key that expired an hour ago."""
    from bench.cached_token import signed_token

    return signed_token(kid, private, time.time() - 7200)


def rfc9068_signature(segment: str) -> bytes:
    """A JWS signature segment's bytes (base64url, no padding)."""
    import base64

    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def main(runs: int = 15) -> None:
    import sidecar

    table = rows()
    origin = Path(sidecar.__file__).resolve().parent.parent
    print(f"thread CPU µs per call, best of {runs} (sidecar from {origin}, ", end="")
    print(f"load {os.getloadavg()[0]:.1f}):")
    for name, (call, flush) in table.items():
        print(f"  {name:28} {_cpu_us(call, flush, runs):7.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
