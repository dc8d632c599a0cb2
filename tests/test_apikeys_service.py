"""The API key use cases against a real SQLite file, with an injected clock."""

from __future__ import annotations

import pytest

from sidecar.core.apikeys import ApiKeyService
from sidecar.core.clock import FakeClock
from sidecar.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from sidecar.core.models import KeyState, Principal, RequestContext
from sidecar.store.sql.sqlite import SqliteStore

DAY = 86400


@pytest.fixture
def svc(store: SqliteStore, clock: FakeClock) -> ApiKeyService:
    return ApiKeyService(store, clock)


@pytest.fixture
def operator(svc: ApiKeyService) -> RequestContext:
    minted = svc.bootstrap_operator_key()
    assert minted is not None
    return RequestContext(svc.authenticate(minted.secret), "req-test")


def ctx_for(svc: ApiKeyService, secret: str) -> RequestContext:
    return RequestContext(svc.authenticate(secret), "req-test")


def test_bootstrap_happens_once(svc: ApiKeyService, operator: RequestContext) -> None:
    assert svc.bootstrap_operator_key() is None
    assert operator.principal.is_operator


def test_lifecycle_create_replace_revoke(svc: ApiKeyService, operator: RequestContext) -> None:
    minted = svc.create(operator, workspace="acme", name="nightly-sync-job", scopes=["checks:read"])
    assert svc.authenticate(minted.secret).key_id == minted.key.id
    repl = svc.replace(operator, minted.key.id)
    assert repl.key.replaces == minted.key.id
    assert repl.replaced is not None and repl.replaced.replaced_by == repl.key.id
    assert (repl.key.name, repl.key.workspace, repl.key.scopes) == (
        "nightly-sync-job",
        "acme",
        frozenset({"checks:read"}),
    )
    # Both keys work until the old one is revoked.
    svc.authenticate(minted.secret)
    svc.authenticate(repl.secret)
    revoked = svc.revoke(operator, minted.key.id, reason="rotated")
    assert revoked.state(0) is KeyState.REVOKED
    with pytest.raises(Unauthenticated, match="revoked"):
        svc.authenticate(minted.secret)
    svc.authenticate(repl.secret)
    # Idempotent: a second revoke changes nothing.
    again = svc.revoke(operator, minted.key.id, reason="other")
    assert again.revoked_at == revoked.revoked_at and again.revoke_reason == "rotated"


def test_default_expiry_is_90_days_and_expired_keys_authenticate_nothing(
    svc: ApiKeyService, operator: RequestContext, clock: FakeClock
) -> None:
    minted = svc.create(operator, workspace="acme", name="k", scopes=["checks:read"])
    assert minted.key.expires_at - minted.key.created_at == 90 * DAY
    clock.advance(90 * DAY - 1)
    svc.authenticate(minted.secret)
    clock.advance(1)
    with pytest.raises(Unauthenticated, match="expired"):
        svc.authenticate(minted.secret)
    assert svc.get(operator, minted.key.id).state(clock.now()) is KeyState.EXPIRED
    page = svc.list(operator, workspace="acme", state=KeyState.EXPIRED)
    assert [k.id for k in page.items] == [minted.key.id]


def test_sweep_records_expiry_once_and_revokes_after_grace(
    svc: ApiKeyService, operator: RequestContext, clock: FakeClock, store: SqliteStore
) -> None:
    short = svc.create(
        operator, workspace="acme", name="s", scopes=["checks:read"], expires_in=3600
    )
    old = svc.create(operator, workspace="acme", name="o", scopes=["checks:read"])
    new = svc.replace(operator, old.key.id, grace=7200)
    assert new.replaced is not None and new.replaced.grace_deadline == clock.now() + 7200
    clock.advance(3600)
    assert svc.sweep() == 1
    assert svc.sweep() == 0
    svc.authenticate(old.secret)
    clock.advance(3600)
    assert svc.sweep() == 1
    with pytest.raises(Unauthenticated, match="revoked"):
        svc.authenticate(old.secret)
    svc.authenticate(new.secret)
    with store.read() as uow:
        actions = [(e.action, e.target) for e in reversed(uow.audit.recent(50))]
        kinds = [c.kind for c in uow.changes.since(0, 100)]
    assert ("key.expired", short.key.id) in actions
    assert ("key.revoked", old.key.id) in actions
    assert kinds.count("credential.expired") == 1
    assert kinds[-1] == "credential.revoked"


def test_expires_in_range(svc: ApiKeyService, operator: RequestContext) -> None:
    for bad in (1, 59, 366 * DAY):
        with pytest.raises(InvalidArgument, match="expires_in"):
            svc.create(operator, workspace="acme", name="k", scopes=["checks:read"], expires_in=bad)
    key = svc.create(
        operator, workspace="acme", name="k", scopes=["checks:read"], expires_in=7 * DAY
    )
    assert key.key.expires_at - key.key.created_at == 7 * DAY


def test_caller_cannot_mint_scopes_it_lacks_or_act_elsewhere(
    svc: ApiKeyService, operator: RequestContext
) -> None:
    manager = svc.create(
        operator, workspace="acme", name="ci", scopes=["keys:manage", "checks:read"]
    )
    ctx = ctx_for(svc, manager.secret)
    svc.create(ctx, workspace="acme", name="ok", scopes=["checks:read"])
    with pytest.raises(PermissionDenied, match="metrics:write"):
        svc.create(ctx, workspace="acme", name="no", scopes=["checks:read", "metrics:write"])
    with pytest.raises(PermissionDenied, match="workspace"):
        svc.create(ctx, workspace="globex", name="no", scopes=["checks:read"])
    other = svc.create(operator, workspace="globex", name="g", scopes=["checks:read"])
    with pytest.raises(PermissionDenied):
        svc.list(ctx, workspace="globex")
    # Another workspace's key, by id, does not exist for the caller (not "denied": that would
    # confirm the id).
    for call in (
        lambda: svc.get(ctx, other.key.id),
        lambda: svc.revoke(ctx, other.key.id),
        lambda: svc.replace(ctx, other.key.id),
    ):
        with pytest.raises(NotFound, match="no API key with id"):
            call()
    # Listing without a filter shows only the caller's workspace.
    assert {k.workspace for k in svc.list(ctx).items} == {"acme"}


def test_admin_full_satisfies_any_scope_in_its_workspace(
    svc: ApiKeyService, operator: RequestContext
) -> None:
    admin = svc.create(operator, workspace="acme", name="admin", scopes=["admin:full"])
    ctx = ctx_for(svc, admin.secret)
    svc.create(ctx, workspace="acme", name="m", scopes=["metrics:write", "admin:full"])
    with pytest.raises(PermissionDenied):
        svc.create(ctx, workspace="globex", name="m", scopes=["metrics:write"])


def test_key_without_keys_manage_cannot_administer(
    svc: ApiKeyService, operator: RequestContext
) -> None:
    reader = svc.create(operator, workspace="acme", name="r", scopes=["checks:read"])
    ctx = ctx_for(svc, reader.secret)
    with pytest.raises(PermissionDenied, match="keys:manage"):
        svc.list(ctx)
    with pytest.raises(PermissionDenied, match="keys:manage"):
        svc.create(ctx, workspace="acme", name="x", scopes=["checks:read"])


def test_replace_preconditions(svc: ApiKeyService, operator: RequestContext) -> None:
    k = svc.create(operator, workspace="acme", name="k", scopes=["checks:read"])
    svc.replace(operator, k.key.id)
    with pytest.raises(FailedPrecondition, match="already replaced"):
        svc.replace(operator, k.key.id)
    svc.revoke(operator, k.key.id)
    with pytest.raises(FailedPrecondition, match="revoked"):
        svc.replace(operator, k.key.id)
    with pytest.raises(NotFound):
        svc.replace(operator, "key_doesnotexist0")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"workspace": "Acme!"}, "workspace"),
        ({"workspace": ""}, "workspace"),
        ({"workspace": "-acme"}, "workspace"),
        ({"workspace": "a" * 64}, "workspace"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "bad\x00name"}, "name"),
        ({"scopes": []}, "scopes"),
        ({"scopes": ["checks:delete"]}, "scopes"),
    ],
)
def test_bad_input_names_the_field_and_changes_nothing(
    svc: ApiKeyService, operator: RequestContext, store: SqliteStore, kwargs: dict, field: str
) -> None:
    args = {"workspace": "acme", "name": "k", "scopes": ["checks:read"], **kwargs}
    with store.read() as uow:
        head = uow.changes.head()
    with pytest.raises(InvalidArgument) as info:
        svc.create(operator, **args)
    assert info.value.field == field
    with store.read() as uow:
        assert uow.changes.head() == head


def test_unknown_scope_message_lists_valid_scopes(
    svc: ApiKeyService, operator: RequestContext
) -> None:
    with pytest.raises(InvalidArgument) as info:
        svc.create(operator, workspace="acme", name="k", scopes=["checks:delete"])
    for scope in ("checks:read", "metrics:write", "admin:full"):
        assert scope in info.value.message


def test_paging_walks_every_key_once(svc: ApiKeyService, operator: RequestContext) -> None:
    created = {
        svc.create(operator, workspace="acme", name=f"k{i}", scopes=["checks:read"]).key.id
        for i in range(7)
    }
    seen: list[str] = []
    token = ""
    while True:
        page = svc.list(operator, workspace="acme", page_size=3, page_token=token)
        seen.extend(k.id for k in page.items)
        token = page.next_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 7 and set(seen) == created
    with pytest.raises(InvalidArgument, match="page_token"):
        svc.list(operator, page_token="!!notatoken")


def test_principal_never_holds_the_secret(svc: ApiKeyService, operator: RequestContext) -> None:
    minted = svc.create(operator, workspace="acme", name="k", scopes=["checks:read"])
    principal: Principal = svc.authenticate(minted.secret)
    assert minted.secret not in repr(principal)
    assert minted.secret not in repr(minted.key)
