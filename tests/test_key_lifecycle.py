"""Editing a key without re-issuing it, suspension, client networks, expiry warnings and rotation
schedules (issue 17): the use cases on both store backends, and enforcement through a real
sidecar fed by a real control plane."""

from __future__ import annotations

import json
from collections.abc import Callable

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar.core.apikeys import ApiKeyService, KeyEdit
from sidecar.core.audit import AuditQuery
from sidecar.core.clock import FakeClock
from sidecar.core.errors import FailedPrecondition, InvalidArgument, NotFound
from sidecar.core.models import KeyState, Principal, RequestContext
from sidecar.core.storage import Store
from sidecar.dataplane.process import Sidecar
from sidecar.ops.key_metrics import KeyExpiryMetrics
from tests.conftest import RunningControlPlane, bearer, wait_until
from tests.test_sidecar_grpc import Client, check_request, mint

DAY = 86400
OPERATOR = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req_1")
TENANT = RequestContext(Principal("key_t", "globex", frozenset({"admin:full"})), "req_2")


def actions(store: Store, target: str) -> list[tuple[str, dict[str, str]]]:
    with store.read() as uow:
        records = uow.audit.recent(100)
    return [(r.action, r.metadata) for r in reversed(records) if r.target == target]


def test_edit_changes_only_what_is_set_audits_and_replicates(store: Store) -> None:
    clock = FakeClock()
    keys = ApiKeyService(store, clock)
    key = keys.create(OPERATOR, workspace="acme", name="ci", scopes=["checks:read"]).key
    with store.read() as uow:
        head = uow.changes.head()
    edited = keys.update(
        OPERATOR,
        key.id,
        KeyEdit(
            name="ci-nightly",
            description="GitHub Actions, repo acme/web",
            rate_limit=(100, 60),
            client_cidrs=["10.1.2.3/8", "2001:db8::1"],
            rotation_period=60 * DAY,
        ),
    )
    assert edited.name == "ci-nightly" and edited.scopes == key.scopes
    assert edited.client_cidrs == ("10.0.0.0/8", "2001:db8::1/128")
    assert edited.rotation_due_at == key.created_at + 60 * DAY
    assert keys.get(OPERATOR, key.id) == edited
    assert actions(store, key.id)[-1] == (
        "key.updated",
        {
            "name": "ci-nightly",
            "description": "GitHub Actions, repo acme/web",
            "rate_limit": "100/m",
            "rate_period": "100/m",
            "client_cidrs": "10.0.0.0/8 2001:db8::1/128",
            "rotation_period": "60d",
        },
    )
    with store.read() as uow:
        (change,) = uow.changes.since(head, 10)
    assert change.kind == "credential.upserted"
    assert change.payload["client_cidrs"] == ["10.0.0.0/8", "2001:db8::1/128"]
    # The same edit again changes nothing and records nothing.
    keys.update(OPERATOR, key.id, KeyEdit(name="ci-nightly"))
    assert len(actions(store, key.id)) == 2
    # Clearing: no rate limit, any network, no schedule.
    cleared = keys.update(
        OPERATOR, key.id, KeyEdit(rate_limit=(0, 0), client_cidrs=[], rotation_period=0)
    )
    assert (cleared.rate_limit, cleared.client_cidrs, cleared.rotation_period) == (0, (), 0)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (KeyEdit(name=""), "name"),
        (KeyEdit(description="x" * 501), "description"),
        (KeyEdit(description="a\nb"), "description"),
        (KeyEdit(rate_limit=(0, 60)), "rate_limit"),
        (KeyEdit(client_cidrs=["10.0.0.0/33"]), "client_cidrs"),
        (KeyEdit(client_cidrs=["example.com"]), "client_cidrs"),
        (KeyEdit(rotation_period=3600), "rotation_period"),
    ],
)
def test_bad_edits_name_the_field(store: Store, edit: KeyEdit, field: str) -> None:
    keys = ApiKeyService(store, FakeClock())
    key = keys.create(OPERATOR, workspace="acme", name="ci", scopes=["checks:read"]).key
    with pytest.raises(InvalidArgument) as info:
        keys.update(OPERATOR, key.id, edit)
    assert info.value.field == field


def test_another_workspace_cannot_edit_suspend_or_resume(store: Store) -> None:
    keys = ApiKeyService(store, FakeClock())
    key = keys.create(OPERATOR, workspace="acme", name="ci", scopes=["checks:read"]).key
    for call in (
        lambda: keys.update(TENANT, key.id, KeyEdit(name="mine")),
        lambda: keys.suspend(TENANT, key.id),
        lambda: keys.resume(TENANT, key.id),
    ):
        with pytest.raises(NotFound, match="no API key with id"):  # not "denied": no disclosure
            call()
    assert keys.get(OPERATOR, key.id) == key


def test_suspend_and_resume_are_idempotent_and_revoked_keys_refuse(store: Store) -> None:
    clock = FakeClock()
    keys = ApiKeyService(store, clock)
    key = keys.create(OPERATOR, workspace="acme", name="ci", scopes=["checks:read"]).key
    suspended = keys.suspend(OPERATOR, key.id, reason="leaked in a log")
    assert suspended.state(clock.now()) is KeyState.SUSPENDED
    assert keys.suspend(OPERATOR, key.id) == suspended
    listed = keys.list(OPERATOR, workspace="acme", state=KeyState.SUSPENDED).items
    assert [k.id for k in listed] == [key.id]
    assert keys.list(OPERATOR, workspace="acme", state=KeyState.ACTIVE).items == []
    resumed = keys.resume(OPERATOR, key.id)
    assert resumed.state(clock.now()) is KeyState.ACTIVE
    assert [a for a, _ in actions(store, key.id)] == ["key.created", "key.suspended", "key.resumed"]
    keys.revoke(OPERATOR, key.id)
    for call in (
        lambda: keys.suspend(OPERATOR, key.id),
        lambda: keys.update(OPERATOR, key.id, KeyEdit(name="x")),
    ):
        with pytest.raises(FailedPrecondition):
            call()


def test_expiry_warning_and_rotation_due_are_recorded_once(store: Store) -> None:
    clock = FakeClock()
    keys = ApiKeyService(store, clock)
    soon = keys.create(
        OPERATOR, workspace="acme", name="soon", scopes=["checks:read"], expires_in=20 * DAY
    ).key
    later = keys.create(OPERATOR, workspace="acme", name="later", scopes=["checks:read"]).key
    scheduled = keys.create(
        OPERATOR, workspace="globex", name="rot", scopes=["checks:read"], rotation_period=2 * DAY
    ).key
    keys.sweep()
    assert keys.expiring_counts() == {}
    clock.advance(7 * DAY)  # soon: 13 days left; scheduled: 5 days past its rotation
    keys.sweep()
    keys.sweep()
    assert [a for a, _ in actions(store, soon.id)] == ["key.created", "key.expiring"]
    assert [a for a, _ in actions(store, later.id)] == ["key.created"]
    assert [a for a, _ in actions(store, scheduled.id)] == ["key.created", "key.rotation_due"]
    assert keys.expiring_counts() == {"acme": 1}
    expiring = keys.list(OPERATOR, expiring_within=14 * DAY).items
    assert [k.id for k in expiring] == [soon.id]
    due = keys.list(OPERATOR, rotation_due=True).items
    assert [k.id for k in due] == [scheduled.id]
    # A replacement clears "due" (the new key's schedule starts now) and inherits the period.
    new = keys.replace(OPERATOR, scheduled.id).key
    assert new.rotation_period == 2 * DAY
    assert keys.list(OPERATOR, rotation_due=True).items == []
    # The operator key is a key like any other: warned when it enters the window.
    operator = keys.bootstrap_operator_key()
    assert operator is not None
    clock.advance(80 * DAY)
    keys.sweep()
    assert "key.expiring" in [a for a, _ in actions(store, operator.key.id)]


# -- through a real sidecar ---------------------------------------------------------------------

StartSidecar = Callable[..., Sidecar]


def call_admin(cp: RunningControlPlane, method: str, request: object) -> pb.ApiKey:
    with cp.channel() as ch:
        resp = getattr(cp.keys_stub(ch), method)(request, metadata=bearer(cp.operator_key))
    return resp.api_key  # type: ignore[no-any-return]


def reason_of(client: Client, secret: str, source: str = "") -> str:
    req = check_request(authorization=f"Bearer {secret}")
    if source:
        req.attributes.source.address.socket_address.address = source
    resp = client.check(req)
    if resp.status.code == 0:
        return "ok"
    meta = resp.dynamic_metadata.fields
    return str(meta["reason"].string_value)


def test_suspension_and_client_networks_are_enforced_by_the_sidecar(
    sidecar_factory: StartSidecar, control_plane: RunningControlPlane
) -> None:
    sc = sidecar_factory()
    client = Client(sc.port)
    secret, key_id = mint(control_plane, ["checks:read"])
    wait_until(lambda: reason_of(client, secret) == "ok")

    suspended = call_admin(control_plane, "SuspendApiKey", pb.SuspendApiKeyRequest(id=key_id))
    assert suspended.state == pb.API_KEY_STATE_SUSPENDED
    wait_until(lambda: reason_of(client, secret) == "suspended_credential")
    resp = client.check(check_request(authorization=f"Bearer {secret}"))
    assert resp.denied_response.status.code == 401
    call_admin(control_plane, "ResumeApiKey", pb.ResumeApiKeyRequest(id=key_id))
    wait_until(lambda: reason_of(client, secret) == "ok")

    edit = pb.UpdateApiKeyRequest(id=key_id)
    edit.client_cidrs.cidrs.append("10.20.0.0/16")
    assert list(call_admin(control_plane, "UpdateApiKey", edit).client_cidrs) == ["10.20.0.0/16"]
    wait_until(lambda: reason_of(client, secret, "10.99.0.1") == "client_not_allowed")
    assert reason_of(client, secret, "10.20.3.4") == "ok"
    assert reason_of(client, secret, "::ffff:10.20.3.4") == "ok"
    assert reason_of(client, secret) == "client_not_allowed"  # unknown source: fail closed
    assert reason_of(client, secret, "not-an-address") == "client_not_allowed"
    denied = client.check(check_request(authorization=f"Bearer {secret}"))
    assert denied.denied_response.status.code == 403

    clear = pb.UpdateApiKeyRequest(id=key_id)
    clear.client_cidrs.SetInParent()
    call_admin(control_plane, "UpdateApiKey", clear)
    wait_until(lambda: reason_of(client, secret, "192.0.2.1") == "ok")


def test_update_rpc_refuses_contradictions_and_other_workspaces(
    control_plane: RunningControlPlane,
) -> None:
    _, key_id = mint(control_plane, ["checks:read"])
    tenant, _ = mint(control_plane, ["admin:full"], workspace="globex")
    both = pb.UpdateApiKeyRequest(
        id=key_id, clear_rate_limit=True, rate_limit=pb.RateLimit(requests=1, period_seconds=1)
    )
    with control_plane.channel() as ch, pytest.raises(grpc.RpcError) as info:
        control_plane.keys_stub(ch).UpdateApiKey(both, metadata=bearer(control_plane.operator_key))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with control_plane.channel() as ch, pytest.raises(grpc.RpcError) as info:
        control_plane.keys_stub(ch).SuspendApiKey(
            pb.SuspendApiKeyRequest(id=key_id), metadata=bearer(tenant)
        )
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_audit_query_finds_edits(store: Store) -> None:
    keys = ApiKeyService(store, FakeClock())
    key = keys.create(OPERATOR, workspace="acme", name="ci", scopes=["checks:read"]).key
    keys.update(OPERATOR, key.id, KeyEdit(description="owner: platform team"))
    with store.read() as uow:
        found = uow.audit.page(AuditQuery(workspaces=frozenset({"acme"})), 10, None)
    assert [r.event.action for r in found][:2] == ["key.updated", "key.created"]


# -- the expiring-keys metric -------------------------------------------------------------------


def test_expiring_metric_labels_are_bounded() -> None:
    metric = KeyExpiryMetrics(14 * DAY, top=2)
    metric.update({"a": 5, "b": 3, "c": 2, "d": 1, "*": 1})
    assert metric.series() == {"a": 5, "b": 3, "other": 3, "operator": 1}
    metric.update({})
    assert metric.series() == {"other": 0}


def test_control_plane_exports_expiring_keys_per_workspace(
    control_plane: RunningControlPlane,
) -> None:
    with control_plane.channel() as ch:
        control_plane.keys_stub(ch).CreateApiKey(
            pb.CreateApiKeyRequest(
                workspace="acme", name="soon", scopes=["checks:read"], expires_in_seconds=3 * DAY
            ),
            metadata=bearer(control_plane.operator_key),
        )
    registry = control_plane.plane.metrics.registry

    def expiring(workspace: str) -> float | None:
        return registry.get_sample_value("spauth_keys_expiring", {"workspace": workspace})

    wait_until(lambda: expiring("acme") == 1)
    assert expiring("other") == 0
    assert registry.get_sample_value("spauth_keys_expiry_warning_seconds") == 14 * DAY


def test_cli_edits_suspends_and_lists(
    control_plane: RunningControlPlane,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sidecar.cli.main import main

    monkeypatch.setenv("STATUSPULSE_API_KEY", control_plane.operator_key)
    ep = ["--endpoint", control_plane.address]
    _, key_id = mint(control_plane, ["checks:read"])
    args = [
        "keys",
        "update",
        key_id,
        "--description",
        "CI of acme/web",
        "--client-cidr",
        "10.0.0.0/8",
    ]
    assert main([*args, "--rotate-every", "60d", *ep]) == 0
    capsys.readouterr()
    assert main(["keys", "show", key_id, *ep]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(None, 1) for line in out.splitlines()[1:])
    assert rows["description"] == "CI of acme/web" and rows["client_cidrs"] == "10.0.0.0/8"
    assert rows["rotate_every"] == "60d" and rows["last_used_at"] == "never"
    assert main(["keys", "suspend", key_id, "--reason", "leak", *ep, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "suspended"
    assert main(["keys", "list", "--state", "suspended", *ep, "-o", "json"]) == 0
    assert [k["id"] for k in json.loads(capsys.readouterr().out)] == [key_id]
    assert main(["keys", "resume", key_id, *ep, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["suspended_at"] is None
    assert main(["keys", "list", "--expiring-within", "14d", *ep, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["keys", "update", key_id, "--rate-limit", "fast", *ep]) == 2  # usage error


def test_edits_suspension_and_webhooks_over_the_http_api(
    control_plane: RunningControlPlane,
) -> None:
    import httpx

    _, key_id = mint(control_plane, ["checks:read"])
    api = f"http://127.0.0.1:{control_plane.plane.http_port}"
    auth = {"authorization": f"Bearer {control_plane.operator_key}"}
    with httpx.Client(base_url=api, headers=auth, timeout=10) as http:
        edited = http.patch(
            f"/v1/keys/{key_id}",
            json={"description": "CI", "client_cidrs": {"cidrs": ["10.0.0.0/8"]}},
        )
        assert edited.status_code == 200, edited.text
        assert edited.json()["api_key"]["client_cidrs"] == ["10.0.0.0/8"]
        suspended = http.post(f"/v1/keys/{key_id}:suspend", json={"reason": "leak"})
        assert suspended.json()["api_key"]["state"] == "API_KEY_STATE_SUSPENDED"
        assert "suspended_at" in suspended.json()["api_key"]
        got = http.get(f"/v1/keys/{key_id}").json()
        assert got["api_key"]["description"] == "CI" and "last_used_at" not in got["api_key"]
        hook = http.post(
            "/v1/workspaces/acme/webhooks",
            json={"url": "https://hooks.example.com/x", "events": ["key.revoked"]},
        )
        assert hook.status_code == 200 and hook.json()["secret"].startswith("whsec_")
        listed = http.get("/v1/workspaces/acme/webhooks").json()
        assert [w["url"] for w in listed["webhooks"]] == ["https://hooks.example.com/x"]
        bad = http.patch(f"/v1/keys/{key_id}", json={"client_cidrs": {"cidrs": ["nope"]}})
        assert bad.status_code == 400
