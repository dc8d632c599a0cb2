"""Metrics scraped over HTTP after real traffic: the sidecar's /metrics on its metrics port, the
control plane's on its HTTP port. Names and label values are the fixed ones dashboards use."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar.authz.decision import Reason
from sidecar.authz.policy_source import default_policy_text
from sidecar.core.keyformat import mint_key
from sidecar.dataplane.envoy_check import SERVICE
from sidecar.dataplane.process import Sidecar
from sidecar.devtools.echo_upstream import EchoUpstream
from sidecar.ops.metrics import ERROR_REASONS
from tests.conftest import RunningControlPlane, bearer
from tests.support.envoy import EnvoyProcess
from tests.support.ops import bearer as bearer_headers
from tests.support.ops import (
    call_check,
    check_request,
    create_key,
    ready,
    running_sidecar,
    sample,
    scrape,
    sidecar_settings,
    status_url,
    wait_until,
)
from tests.support.ports import free_ports
from tests.test_oauth_flow import OAuthEnv, oauth_env, tokens

CHECKS = "/v1/workspaces/acme/checks/1"
DECISIONS = "spauth_decisions_total"
__all__ = ["oauth_env"]  # the OAuth flow's fixture, reused here


def test_sidecar_metrics_after_real_checks(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    secret, key_id = create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    settings = sidecar_settings(control_plane.address, tmp_path / "sc")
    with running_sidecar(settings, control_plane.clock) as sidecar:
        wait_until(sidecar.ready, what="replica loaded")
        allowed = check_request(CHECKS, bearer_headers(secret))
        for _ in range(3):
            assert call_check(sidecar.port, allowed).status.code == 0
        for _ in range(2):
            call_check(sidecar.port, check_request(CHECKS, bearer_headers(mint_key())))
        call_check(sidecar.port, check_request(CHECKS))
        call_check(sidecar.port, check_request(CHECKS, bearer_headers(secret), method="POST"))
        call_check(sidecar.port, check_request("/healthz"))
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            garbage = channel.unary_unary(f"/{SERVICE}/Check")
            with pytest.raises(grpc.RpcError) as err:
                garbage(b"\xff\xff\xff", timeout=5)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        url = status_url(sidecar)
        samples = scrape(url)
        body = requests.get(url + "/metrics", timeout=5).text

    assert sample(samples, DECISIONS, outcome="allow", reason="ok") == 3
    assert sample(samples, DECISIONS, outcome="allow", reason="public_route") == 1
    assert sample(samples, DECISIONS, outcome="deny", reason="unknown_credential") == 2
    assert sample(samples, DECISIONS, outcome="deny", reason="missing_credential") == 1
    assert sample(samples, DECISIONS, outcome="deny", reason="insufficient_scope") == 1
    assert sample(samples, DECISIONS, outcome="error", reason="malformed_check_request") == 1
    # Every decided check is timed; the garbage one never reached a decision.
    assert sample(samples, "spauth_check_duration_seconds_count") == 8
    assert sample(samples, "spauth_check_duration_seconds_bucket", le="+Inf") == 8
    with control_plane.plane.store.read() as uow:
        head = uow.changes.head()
    assert sample(samples, "spauth_replica_revision") == head >= 1
    assert sample(samples, "spauth_replica_staleness_seconds") >= 0
    for name in ("spauth_sync_reconnects_total", "spauth_audit_queue_depth",
                 "spauth_audit_spool_bytes"):  # fmt: skip
        assert (name, frozenset()) in samples, name
    assert sample(samples, "spauth_audit_dropped_total", outcome="deny") == 0
    assert sample(samples, "spauth_policy_reloads_total", result="ok") == 0
    # Bounded label values: reason codes and three outcomes, never a key id or a path.
    labels = {dict(k[1]).get("reason") for k in samples if k[0] == DECISIONS}
    assert labels == {r.value for r in Reason} | set(ERROR_REASONS)
    outcomes = {dict(k[1])["outcome"] for k in samples if k[0] == DECISIONS}
    assert outcomes == {"allow", "deny", "error"}
    assert key_id not in body and "acme" not in body and secret not in body


def test_policy_reloads_are_counted_by_result(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(default_policy_text())
    settings = sidecar_settings(
        control_plane.address, tmp_path / "sc", policy_file=str(policy), policy_poll_interval=0.25
    )
    with running_sidecar(settings, control_plane.clock) as sidecar:
        url = status_url(sidecar)
        policy.write_text(default_policy_text() + "\n# touched\n")
        wait_until(lambda: sample(scrape(url), "spauth_policy_reloads_total", result="ok") == 1)
        policy.write_text("[[routes]]\nname = 'broken'\n")
        wait_until(lambda: sample(scrape(url), "spauth_policy_reloads_total", result="error") == 1)
        assert sample(scrape(url), "spauth_policy_reloads_total", result="ok") == 1


def test_admin_calls_by_method_and_code(control_plane: RunningControlPlane) -> None:
    create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    with control_plane.channel() as channel:
        stub = control_plane.keys_stub(channel)
        with pytest.raises(grpc.RpcError):
            stub.ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(mint_key()), timeout=5)
        stub.ListApiKeys(
            pb.ListApiKeysRequest(), metadata=bearer(control_plane.operator_key), timeout=5
        )
        # Unknown methods are not counted (no attacker-chosen label values), nor health probes.
        probe = channel.unary_unary("/statuspulse.auth.v1.ApiKeyService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as err:
            probe(b"", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    url = f"http://127.0.0.1:{control_plane.plane.http_port}"
    samples = scrape(url)
    calls = {
        (dict(k[1])["method"], dict(k[1])["code"]): v
        for k, v in samples.items()
        if k[0] == "spauth_admin_calls_total"
    }
    assert calls == {
        ("ApiKeyService/CreateApiKey", "OK"): 1,
        ("ApiKeyService/ListApiKeys", "UNAUTHENTICATED"): 1,
        ("ApiKeyService/ListApiKeys", "OK"): 1,
    }
    for event in ("issued", "refreshed", "revoked", "reuse_detected"):
        assert ("spauth_oauth_tokens_total", frozenset({("event", event)})) in samples


@pytest.mark.envoy
def test_metrics_after_traffic_through_envoy(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    secret, _ = create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    settings = sidecar_settings(control_plane.address, tmp_path / "sc")
    with (
        running_sidecar(settings, control_plane.clock) as sidecar,
        EchoUpstream() as echo,
        EnvoyProcess(authz=("127.0.0.1", sidecar.port), upstream=("127.0.0.1", echo.port)) as envoy,
    ):
        wait_until(sidecar.ready, what="replica loaded")
        statuses = [
            requests.get(envoy.url + CHECKS, headers=bearer_headers(secret), timeout=5).status_code
            for _ in range(5)
        ]
        statuses += [
            requests.get(
                envoy.url + CHECKS, headers=bearer_headers(mint_key()), timeout=5
            ).status_code
            for _ in range(3)
        ]
        assert statuses == [200] * 5 + [401] * 3
        samples = scrape(status_url(sidecar))
    assert sample(samples, DECISIONS, outcome="allow", reason="ok") == 5
    assert sample(samples, DECISIONS, outcome="deny", reason="unknown_credential") == 3
    assert sample(samples, "spauth_check_duration_seconds_count") == 8


def test_metrics_port_conflict_is_a_clear_error(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    settings = sidecar_settings(control_plane.address, tmp_path / "a")
    with running_sidecar(settings, control_plane.clock) as first:
        assert first.status_server is not None
        taken = f"127.0.0.1:{first.status_server.port}"
        second = Sidecar(
            sidecar_settings(control_plane.address, tmp_path / "b", metrics_addr=taken)
        )
        with pytest.raises(OSError, match="metrics_addr"):
            second.start()
        second.stop(grace=0)


def test_serve_exposes_both_halves_on_its_http_port(tmp_path: Path) -> None:
    admin, http, side = free_ports(3)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--data-dir", str(tmp_path / "data"),
         "--admin-addr", f"127.0.0.1:{admin}", "--http-addr", f"127.0.0.1:{http}",
         "--sidecar-addr", f"127.0.0.1:{side}"],
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{http}"
        wait_until(lambda: _ready_status(url) == (200, "serving"), what="serve ready")
        operator = (tmp_path / "data" / "bootstrap-key").read_text().strip()
        secret, _ = create_key(f"127.0.0.1:{admin}", operator, ["checks:read"])
        request = check_request(CHECKS, bearer_headers(secret))
        wait_until(lambda: call_check(side, request).status.code == 0, what="key replicated")
        samples = scrape(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()
    # One process, one registry: the sidecar's and the control plane's metrics together.
    assert sample(samples, DECISIONS, outcome="allow", reason="ok") >= 1
    assert sample(samples, "spauth_admin_calls_total", method="ApiKeyService/CreateApiKey",
                  code="OK") == 1  # fmt: skip
    assert ("spauth_replica_revision", frozenset()) in samples


def _ready_status(url: str) -> tuple[int, str]:
    try:
        status, body = ready(url)
    except OSError:
        return 0, ""
    return status, str(body["status"])


def test_oauth_token_events_are_counted(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, client_secret = env.register()
    env.member()
    client = env.client(client_id, client_secret)
    first = tokens(env, client)
    client.refresh_token(env.url("/oauth/token"), refresh_token=first["refresh_token"])
    # Presenting the rotated-away refresh token again is reuse (RFC 9700 §4.14.2).
    requests.post(
        env.url("/oauth/token"),
        data={"grant_type": "refresh_token", "refresh_token": str(first["refresh_token"])},
        auth=(client_id, client_secret),
        timeout=5,
    )
    samples = scrape(f"http://127.0.0.1:{env.plane.http_port}")
    events = {
        dict(k[1])["event"]: v for k, v in samples.items() if k[0] == "spauth_oauth_tokens_total"
    }
    assert events["issued"] >= 1 and events["refreshed"] == 1 and events["reuse_detected"] == 1
    assert set(events) == {"issued", "refreshed", "revoked", "reuse_detected"}
