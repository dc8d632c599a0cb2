"""JWT rows: the sidecar checking an OAuth access token (RS256, RFC 9068) obtained from a real
control plane through the authorization-code flow with PKCE (bench.oauth_setup).

* ``sidecar-jwt`` / ``jwt-cached``: the sidecar as shipped. It caches verified tokens by
  digest, and h2load repeats the same bytes, so after the first request this prices a cache hit.
* ``sidecar-jwt-nocache`` / ``jwt-cold``: the same with ``SPAUTH_SIDECAR_TOKEN_CACHE_SIZE=0``,
  so every request verifies the signature and claims: the cost of a token seen for the first
  time. (A cache-off target is the honest way to get it: h2load cannot vary the token.)

The control plane is kept off the server CPUs and its CPU is not counted in the row's server CPU
(as in bench.sidecar_target): it ingests the sidecar's decision records, which is not the
sidecar's work. It is reported on its own, per stored record (``cp_cpu_us_per_record``,
bench.cp_cost), as for the API-key rows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace

from envoy.service.auth.v3 import external_auth_pb2

from bench import cp_cost
from bench.cases import Case, grpc_case, typical_headers
from bench.oauth_setup import access_token, control_plane
from bench.sidecar_target import CHECKS, _serving, with_check_path
from bench.targets import (
    _PROJECT_ROOT,
    SERVER_ENV,
    RunningTarget,
    TargetEnv,
    launch_process,
    log_path,
)

SUBJECT = "x-statuspulse-subject"


def _subject_header(response: external_auth_pb2.CheckResponse) -> str | None:
    """An allow for a token names the member, not a key (CONTEXT: identity headers)."""
    headers = {h.header.key for h in response.ok_response.headers}
    return None if SUBJECT in headers else f"no {SUBJECT} header on the allow"


def jwt_cases(case: str, token: str) -> list[Case]:
    """One allow: a Bearer access token carrying checks:read on the checks route."""
    headers = typical_headers(authorization=f"Bearer {token}")
    return [grpc_case(case, headers, "allow", path=CHECKS, check=_subject_header)]


@contextlib.contextmanager
def _sidecar_jwt(
    env: TargetEnv, name: str, case: str, extra_env: Mapping[str, str]
) -> Iterator[RunningTarget]:
    with control_plane(env, f"{name}-control-plane", pin=False) as cp:
        # Minted before the sidecar starts, so its first snapshot holds the signing key.
        _, answer = access_token(cp)
        argv = [
            env.python, "-m", "sidecar", "sidecar", "--listen", "{listen}",
            "--control-plane", cp.admin, "--state-dir", str(env.workdir / f"{name}-state"),
            "--metrics-addr", "", "--threads", "4", "--oauth-issuer", cp.issuer,
            "--sync-token-file", str(cp.data / "sync-token"),
        ]  # fmt: skip
        with launch_process(
            env,
            name,
            argv,
            jwt_cases(case, str(answer["access_token"])),
            extra_env={**SERVER_ENV, **extra_env},
            cwd=_PROJECT_ROOT,
            ready=_serving,
        ) as target:
            meter = cp_cost.meter(cp.pid, cp.http, cp.data / "spauth.db")
            target = with_check_path(target, log_path(env, name))
            yield replace(target, ingest=meter)


def sidecar_jwt(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """A repeated access token: the verified-token cache answers."""
    return _sidecar_jwt(env, "sidecar-jwt", "jwt-cached", {})


def sidecar_jwt_nocache(env: TargetEnv) -> AbstractContextManager[RunningTarget]:
    """The token cache off: every request verifies the RS256 signature (a cold token)."""
    return _sidecar_jwt(
        env, "sidecar-jwt-nocache", "jwt-cold", {"SPAUTH_SIDECAR_TOKEN_CACHE_SIZE": "0"}
    )


__all__ = ["jwt_cases", "sidecar_jwt", "sidecar_jwt_nocache"]
