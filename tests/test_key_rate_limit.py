"""Per-key request-rate limits from creation to enforcement: the API field, the CLI flag, the
migration, the replicated payload, and the sidecar refusing the excess with 429."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar.authz.decision import Reason
from sidecar.authz.engine import CheckInput
from sidecar.cli.main import main as spauth
from sidecar.store.sql.sqlite import SqliteStore
from tests.conftest import RunningControlPlane, bearer, wait_until
from tests.support.ops import call_check, check_request


def create(
    cp: RunningControlPlane, rate: pb.RateLimit | None, name: str = "limited"
) -> pb.CreateApiKeyResponse:
    with cp.channel() as channel:
        request = pb.CreateApiKeyRequest(
            workspace="acme", name=name, scopes=["checks:read"], rate_limit=rate
        )
        return cp.keys_stub(channel).CreateApiKey(request, metadata=bearer(cp.operator_key))


def test_the_api_stores_and_shows_a_rate_limit(control_plane: RunningControlPlane) -> None:
    made = create(control_plane, pb.RateLimit(requests=100, period_seconds=1))
    assert made.api_key.rate_limit == pb.RateLimit(requests=100, period_seconds=1)
    plain = create(control_plane, None, "plain")
    assert not plain.api_key.HasField("rate_limit")
    with control_plane.channel() as channel:
        stub = control_plane.keys_stub(channel)
        meta = bearer(control_plane.operator_key)
        got = stub.GetApiKey(pb.GetApiKeyRequest(id=made.api_key.id), metadata=meta)
        assert got.api_key.rate_limit.requests == 100
        new = stub.CreateReplacementApiKey(
            pb.CreateReplacementApiKeyRequest(id=made.api_key.id), metadata=meta
        )
        assert new.api_key.rate_limit == made.api_key.rate_limit  # replacements inherit it


@pytest.mark.parametrize(
    ("requests", "period"), [(0, 1), (100, 0), (2_000_000, 1), (100, 7200), (-1, 1)]
)
def test_out_of_range_limits_are_refused(
    control_plane: RunningControlPlane, requests: int, period: int
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        create(control_plane, pb.RateLimit(requests=requests, period_seconds=period))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "rate_limit" in (err.value.details() or "")


def test_the_cli_flag(
    control_plane: RunningControlPlane,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("STATUSPULSE_API_KEY", control_plane.operator_key)
    common = ["--endpoint", control_plane.address]
    args = ["keys", "create", "--workspace", "acme", "--name", "ci", "--scope", "checks:read"]
    assert spauth([*args, "--rate-limit", "6000/m", *common, "-o", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rate_limit"] == "6000/m"
    assert spauth(["keys", "show", shown["id"], *common, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rate_limit"] == "6000/m"
    assert spauth([*args, "--rate-limit", "fast", *common]) != 0
    assert "malformed rate" in capsys.readouterr().err


def test_migration_0004_adds_the_columns_to_an_existing_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as conn:  # back to the schema before 0004, with a key in it
        conn.execute("ALTER TABLE api_keys DROP COLUMN rate_limit")
        conn.execute("ALTER TABLE api_keys DROP COLUMN rate_period")
        conn.execute("DELETE FROM schema_migrations WHERE version = 4")
        conn.execute(
            "INSERT INTO api_keys (id, digest, last_four, name, workspace, scopes, created_at, "
            "expires_at, created_by) VALUES ('key_old', x'00', 'abcd', 'old', 'acme', "
            "'checks:read', 1, 2, 'system')"
        )
    conn.close()
    store = SqliteStore(path)
    try:
        with store.read() as uow:
            key = uow.keys.get("key_old")
        assert key is not None and (key.rate_limit, key.rate_period) == (0, 0)
    finally:
        store.close()


def test_a_sidecar_enforces_the_replicated_limit(
    control_plane: RunningControlPlane, sidecar_factory: object
) -> None:
    made = create(control_plane, pb.RateLimit(requests=5, period_seconds=10))
    sidecar = sidecar_factory()  # type: ignore[operator]
    wait_until(lambda: any(c.id == made.api_key.id for c in sidecar.replica.by_digest.values()))
    headers = {"authorization": f"Bearer {made.key}"}
    view = CheckInput("GET", "/v1/workspaces/acme/checks", "api", headers, {}, "10.0.0.1")
    decisions = [sidecar.engine.check(view) for _ in range(7)]
    assert [d.reason for d in decisions] == [Reason.OK] * 5 + [Reason.RATE_LIMITED] * 2
    assert decisions[-1].http_status == 429
    control_plane.clock.advance(10)
    assert sidecar.engine.check(view).reason is Reason.OK


def test_the_sidecars_429_says_when_to_retry(
    control_plane: RunningControlPlane, sidecar_factory: object
) -> None:
    made = create(control_plane, pb.RateLimit(requests=2, period_seconds=30))
    sidecar = sidecar_factory()  # type: ignore[operator]
    wait_until(lambda: any(c.id == made.api_key.id for c in sidecar.replica.by_digest.values()))
    request = check_request("/v1/workspaces/acme/checks", {"authorization": f"Bearer {made.key}"})
    answers = [call_check(sidecar.port, request) for _ in range(3)]
    assert [a.status.code for a in answers[:2]] == [0, 0]
    denied = answers[2].denied_response
    assert denied.status.code == 429
    assert {h.header.key: h.header.value for h in denied.headers}["retry-after"] == "30"
