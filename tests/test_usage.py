"""Credential usage (issue 17): the per-thread tally on the Check path, the reporter's at-least-once
delivery to a real control plane, the store over both backends, and last-used end to end from
real Check calls to ``GetApiKey``/``ListApiKeys``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as keys_pb
from sidecar._gen.statuspulse.auth.v1 import usage_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import usage_pb2_grpc as pb_grpc
from sidecar.authz.decision import Decision, Identity, Reason
from sidecar.authz.engine import CheckInput
from sidecar.core.apikeys import ApiKeyService
from sidecar.core.clock import FakeClock
from sidecar.core.errors import InvalidArgument, PermissionDenied
from sidecar.core.models import Principal, RequestContext
from sidecar.core.native import optional_module
from sidecar.core.storage import Store
from sidecar.core.usage import DAY, CredentialUse, UsageReport, UsageService, UseKind
from sidecar.dataplane.process import Sidecar
from sidecar.usage import GrpcUsageTransport, UsageReporter, UsageTally
from sidecar.usage.tally import UsageStore
from sidecar.usage.transport import to_pb
from tests.conftest import RunningControlPlane, bearer, free_port, wait_until
from tests.support.sync import TEST_SYNC_TOKEN
from tests.test_sidecar_grpc import Client, check_request, mint

VIEW = CheckInput("GET", "/", "h", {}, {})
OPERATOR = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req_1")


def key_identity(key_id: str) -> Identity:
    return Identity("api_key", key_id, "acme", frozenset({"checks:read"}), 2e9)


def token_identity(jti: str, grant: str) -> Identity:
    return Identity("access_token", jti, "acme", frozenset(), 2e9, grant_id=grant)


# -- the tally ----------------------------------------------------------------------------------


def test_tally_counts_authenticated_uses_per_key_and_per_grant() -> None:
    clock = FakeClock()
    tally = UsageTally(clock.now)
    for _ in range(3):
        tally(Decision(Reason.OK, "d", key_identity("key_a")), VIEW, "", 0.0)
    tally(Decision(Reason.INSUFFICIENT_SCOPE, "d", key_identity("key_a")), VIEW, "", 0.0)
    tally(Decision(Reason.OK, "d", token_identity("jti_1", "grt_x")), VIEW, "", 0.0)
    tally(Decision(Reason.OK, "d", token_identity("jti_2", "grt_x")), VIEW, "", 0.0)
    # Not uses: a revoked key presented, no credential, a public route.
    tally(Decision(Reason.REVOKED_CREDENTIAL, "d", key_identity("key_r")), VIEW, "", 0.0)
    tally(Decision(Reason.MISSING_CREDENTIAL, "d"), VIEW, "", 0.0)
    tally(Decision(Reason.PUBLIC_ROUTE, "d"), VIEW, "", 0.0)
    # Counted up to a harvest are read at the next one (a thread may still hold the old dict).
    assert tally.harvest() == ({}, clock.now())
    clock.advance(5)
    counts, at = tally.harvest()
    assert counts == {"key_a": 4, "grt_x": 2}
    assert at == clock.now() - 5  # every counted use happened before this time


def test_tally_sums_threads_and_final_harvest_takes_everything() -> None:
    clock = FakeClock()
    tally = UsageTally(clock.now)

    def work() -> None:
        for _ in range(1000):
            tally(Decision(Reason.OK, "d", key_identity("key_a")), VIEW, "", 0.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts, _ = tally.harvest(final=True)
    assert counts == {"key_a": 4000}
    assert tally.harvest(final=True)[0] == {}


def test_tally_memory_is_bounded_and_overflow_is_counted() -> None:
    tally = UsageTally(FakeClock().now, max_entries=2)
    for name in ("key_a", "key_b", "key_c", "key_a"):
        tally(Decision(Reason.OK, "d", key_identity(name)), VIEW, "", 0.0)
    counts, _ = tally.harvest(final=True)
    assert counts == {"key_a": 2, "key_b": 1}
    assert tally.dropped == 1


_native, _why = optional_module("sidecar.dataplane._fastcheck")
_compiled = pytest.mark.skipif(_native is None, reason=f"not built: {_why}")


def _store(max_entries: int) -> UsageStore:
    assert _native is not None
    store: UsageStore = _native.UsageCounts(max_entries)
    return store


@_compiled
def test_a_tally_counting_in_the_compiled_paths_store_keeps_its_rules() -> None:
    """What the compiled Check path counts in C and what the Python observer counts share the
    store, so one bound covers both; harvests still report a use one interval later and take
    what the threads counted before the switch."""
    clock = FakeClock()
    tally = UsageTally(clock.now, max_entries=2)
    tally(Decision(Reason.OK, "d", key_identity("key_early")), VIEW, "", 0.0)
    store = _store(tally.max_entries)
    tally.use_store(store)
    tally.use_store(store)  # a second compiled handler on the same tally
    with pytest.raises(RuntimeError):
        tally.use_store(_store(2))
    tally(Decision(Reason.OK, "d", token_identity("jti_1", "grt_x")), VIEW, "", 0.0)
    store.count("key_a")  # as the C path counts
    tally(Decision(Reason.OK, "d", key_identity("key_b")), VIEW, "", 0.0)  # over the bound
    store.count("grt_x")
    tally(Decision(Reason.MISSING_CREDENTIAL, "d"), VIEW, "", 0.0)
    assert tally.dropped == 1
    assert tally.harvest() == ({}, clock.now())
    clock.advance(5)
    store.count("key_b")  # a new interval: room again
    assert tally.harvest() == ({"key_early": 1, "grt_x": 2, "key_a": 1}, clock.now() - 5)
    assert tally.harvest(final=True)[0] == {"key_b": 1}
    assert tally.harvest(final=True)[0] == {}
    assert tally.dropped == 1
    with pytest.raises(TypeError):
        store.count(b"key_a")  # type: ignore[arg-type]

    class Name(str):
        __slots__ = ()

    store.count(Name("key_c"))
    store.count("key_c")
    assert store.harvest() == ({"key_c": 2}, 0)  # a str subclass counts as the str it equals


@_compiled
def test_the_compiled_paths_store_counts_every_thread_under_one_bound() -> None:
    tally = UsageTally(FakeClock().now, max_entries=3)
    tally.use_store(_store(3))

    def work(n: int) -> None:
        for i in range(1000):
            tally(Decision(Reason.OK, "d", key_identity(f"key_{(n + i) % 5}")), VIEW, "", 0.0)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts, _ = tally.harvest(final=True)
    assert len(counts) == 3 and sum(counts.values()) + tally.dropped == 4000


# -- the store, on both backends ----------------------------------------------------------------


def use(cid: str, uses: int, at: int, kind: UseKind = UseKind.API_KEY) -> CredentialUse:
    return CredentialUse(cid, kind, uses, at)


def test_store_counts_a_report_once_and_keeps_the_latest_use(store: Store) -> None:
    t = 1_800_000_000
    with store.transaction() as uow:
        assert uow.usage.record("r1", [use("key_a", 3, t), use("grt_x", 1, t)], t)
    with store.transaction() as uow:
        assert not uow.usage.record("r1", [use("key_a", 3, t)], t)  # a resend
        # An older report arriving late does not move last use back; counts still add up.
        assert uow.usage.record("r0", [use("key_a", 2, t - DAY)], t)
        assert uow.usage.record("r2", [use("key_a", 5, t + 10)], t)
    with store.read() as uow:
        assert uow.usage.last_used(["key_a", "grt_x", "key_never"]) == {
            "key_a": t + 10,
            "grt_x": t,
        }
        day = t // DAY
        assert uow.usage.daily("key_a", day - 30) == [(day - 1, 2), (day, 8)]
        assert uow.usage.daily("key_a", day) == [(day, 8)]
    with store.transaction() as uow:
        assert uow.usage.prune(t // DAY, t) == 1  # the older day's row (reports arrived at t)
    with store.read() as uow:
        assert uow.usage.daily("key_a", 0) == [(t // DAY, 8)]
    with store.transaction() as uow:
        assert uow.usage.prune(0, t + 1) == 3  # the three report ids
        assert uow.usage.record("r1", [use("key_a", 1, t)], t)  # forgotten: counted again


def test_store_lists_keys_unused_since(store: Store) -> None:
    clock = FakeClock(1_800_000_000)
    keys = ApiKeyService(store, clock)
    old_used = keys.create(OPERATOR, workspace="acme", name="used", scopes=["checks:read"])
    old_idle = keys.create(OPERATOR, workspace="acme", name="idle", scopes=["checks:read"])
    clock.advance(40 * DAY)
    fresh = keys.create(OPERATOR, workspace="acme", name="fresh", scopes=["checks:read"])
    usage = UsageService(store, clock)
    usage.report(OPERATOR, UsageReport("r1", (use(old_used.key.id, 1, int(clock.now())),)))
    page = keys.list(OPERATOR, workspace="acme", unused_for=30 * DAY)
    assert [k.id for k in page.items] == [old_idle.key.id]
    everything = keys.list(OPERATOR, workspace="acme")
    assert everything.last_used == {old_used.key.id: int(clock.now())}
    assert {k.id for k in everything.items} == {old_used.key.id, old_idle.key.id, fresh.key.id}


# -- the use case: who may report, what is refused ----------------------------------------------


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (UsageReport("", ()), "report_id"),
        (UsageReport("r 1", ()), "report_id"),
        (UsageReport("r", (use("key a", 1, 1_800_000_000),)), "uses.credential_id"),
        (UsageReport("r", (use("key_a", 0, 1_800_000_000),)), "uses.uses"),
        (UsageReport("r", (use("key_a", 1, 1_800_000_000 + 3600),)), "uses.last_use_time"),
        (UsageReport("r", (use("key_a", 1, 0),)), "uses.last_use_time"),
    ],
)
def test_bad_reports_are_refused_with_the_field(
    tmp_path: Path, bad: UsageReport, field: str
) -> None:
    from sidecar.store.sql.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "s.db")
    with pytest.raises(InvalidArgument) as info:
        UsageService(store, FakeClock(1_800_000_000)).report(OPERATOR, bad)
    assert info.value.field == field
    store.close()


def test_a_workspace_key_cannot_report_usage(tmp_path: Path) -> None:
    from sidecar.store.sql.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "s.db")
    tenant = RequestContext(Principal("key_t", "globex", frozenset({"admin:full"})), "req_2")
    with pytest.raises(PermissionDenied):
        UsageService(store, FakeClock()).report(tenant, UsageReport("r", ()))
    store.close()


# -- over gRPC, against a real control plane ----------------------------------------------------


def report_rpc(cp: RunningControlPlane, request: pb.ReportUsageRequest, key: str) -> bool:
    with cp.channel() as channel:
        stub = pb_grpc.UsageServiceStub(channel)
        return bool(stub.ReportUsage(request, metadata=bearer(key) if key else ()).stored)


def get_key(cp: RunningControlPlane, key_id: str) -> keys_pb.GetApiKeyResponse:
    with cp.channel() as ch:
        return cp.keys_stub(ch).GetApiKey(  # type: ignore[no-any-return]
            keys_pb.GetApiKeyRequest(id=key_id), metadata=bearer(cp.operator_key)
        )


def test_report_usage_rpc_is_idempotent_and_refuses_tenants(
    control_plane: RunningControlPlane,
) -> None:
    secret, key_id = mint(control_plane, ["admin:full"], workspace="globex")
    _, victim = mint(control_plane, ["checks:read"], workspace="acme")
    now = int(control_plane.clock.now())
    request = to_pb(UsageReport("rep_1", (use(victim, 7, now),)))
    # A sidecar reports with the sync token; a second report with the same id counts nothing.
    assert report_rpc(control_plane, request, TEST_SYNC_TOKEN)
    assert not report_rpc(control_plane, request, TEST_SYNC_TOKEN)
    with pytest.raises(grpc.RpcError) as info:  # without a credential: nobody
        report_rpc(control_plane, request, "")
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    got = get_key(control_plane, victim)
    assert got.api_key.last_use_time.seconds == now
    assert [(d.uses) for d in got.daily_uses] == [7]
    # Another workspace's admin key cannot make acme's key look used.
    with pytest.raises(grpc.RpcError) as info:
        report_rpc(control_plane, to_pb(UsageReport("rep_2", (use(victim, 1, now),))), secret)
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    bad = pb.ReportUsageRequest(report_id="rep_3")
    bad.uses.add(credential_id=key_id, kind=pb.CREDENTIAL_KIND_UNSPECIFIED, uses=1)
    with pytest.raises(grpc.RpcError) as info:
        report_rpc(control_plane, bad, TEST_SYNC_TOKEN)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_reporter_resends_after_a_failure_and_counts_once(
    control_plane: RunningControlPlane,
) -> None:
    _, key_id = mint(control_plane, ["checks:read"])
    clock = control_plane.clock
    tally = UsageTally(clock.now)
    # The first target is down: the first send fails, the transport moves to the live one.
    transport = GrpcUsageTransport(
        [f"127.0.0.1:{free_port()}", control_plane.address], TEST_SYNC_TOKEN
    )
    monotonic = FakeClock(0)
    reporter = UsageReporter(tally, transport, interval=1.0, clock=monotonic.now)
    for _ in range(5):
        tally(Decision(Reason.OK, "d", key_identity(key_id)), VIEW, "", 0.0)
    assert not reporter.poll(final=True)
    assert reporter.stats().pending == 5 and reporter.stats().failures == 1
    assert not reporter.poll()  # the backoff has not passed: nothing sent
    for _ in range(2):
        tally(Decision(Reason.OK, "d", key_identity(key_id)), VIEW, "", 0.0)
    monotonic.advance(60)
    assert reporter.close()  # the frozen report, then the next one
    assert reporter.stats().reported == 7 and reporter.stats().pending == 0
    assert [d.uses for d in get_key(control_plane, key_id).daily_uses] == [7]


# -- end to end: Check calls through a real sidecar ---------------------------------------------

StartSidecar = Callable[..., Sidecar]


def test_last_used_from_checks_and_of_a_replaced_key(
    sidecar_factory: StartSidecar, control_plane: RunningControlPlane
) -> None:
    sc = sidecar_factory(usage_report_interval=0.05)
    client = Client(sc.port)
    secret, key_id = mint(control_plane, ["checks:read"])
    _, idle_id = mint(control_plane, ["checks:read"])
    request = check_request(authorization=f"Bearer {secret}")
    # The first allow waits for the key to replicate (an unknown key is not a use).
    wait_until(lambda: client.check(request).status.code == 0)
    for _ in range(2):
        assert client.check(request).status.code == 0
    wait_until(lambda: sum(d.uses for d in get_key(control_plane, key_id).daily_uses) == 3)
    registry = sc.metrics.registry
    # The control plane stores a report before the reporter hears back: wait for its count.
    wait_until(lambda: registry.get_sample_value("spauth_usage_reported_total") == 3)
    assert registry.get_sample_value("spauth_usage_pending") == 0
    assert registry.get_sample_value("spauth_usage_dropped_total") == 0
    used_at = get_key(control_plane, key_id).api_key.last_use_time.seconds
    assert used_at == int(control_plane.clock.now())
    assert not get_key(control_plane, idle_id).api_key.HasField("last_use_time")
    # Replace the key: the old one still says when it was last used.
    with control_plane.channel() as ch:
        new = control_plane.keys_stub(ch).CreateReplacementApiKey(
            keys_pb.CreateReplacementApiKeyRequest(id=key_id),
            metadata=bearer(control_plane.operator_key),
        )
    old = get_key(control_plane, key_id).api_key
    assert old.replaced_by == new.api_key.id and old.last_use_time.seconds == used_at
    # Stale keys: 31 days later both old keys are unused for 30 days; the new one was used.
    control_plane.clock.advance(31 * DAY)
    now = int(control_plane.clock.now())
    fresh = to_pb(UsageReport("rep_n", (use(new.api_key.id, 1, now),)))
    report_rpc(control_plane, fresh, TEST_SYNC_TOKEN)
    with control_plane.channel() as ch:
        stale = control_plane.keys_stub(ch).ListApiKeys(
            keys_pb.ListApiKeysRequest(workspace="acme", unused_for_seconds=30 * DAY),
            metadata=bearer(control_plane.operator_key),
        )
    assert {k.id for k in stale.api_keys} == {key_id, idle_id}


def test_a_sidecar_with_a_sync_token_file_reports_usage(
    sidecar_factory: StartSidecar, control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    """The token in ``sync_token_file`` (a mounted Secret, as ``deploy/k8s`` does) is the one
    usage reports present too: they used to send only ``sync_token``, so a sidecar given the
    file replicated and shipped audit but every report was refused as unauthenticated."""
    token_file = tmp_path / "sync-token"
    token_file.write_text(TEST_SYNC_TOKEN + "\n")
    token_file.chmod(0o600)
    sc = sidecar_factory(usage_report_interval=0.05, sync_token="", sync_token_file=token_file)
    client = Client(sc.port)
    secret, key_id = mint(control_plane, ["checks:read"])
    request = check_request(authorization=f"Bearer {secret}")
    wait_until(lambda: client.check(request).status.code == 0)
    wait_until(lambda: sum(d.uses for d in get_key(control_plane, key_id).daily_uses) == 1)
    registry = sc.metrics.registry
    wait_until(lambda: registry.get_sample_value("spauth_usage_reported_total") == 1)


def test_an_apps_session_shows_the_last_access_token_use(store: Store) -> None:
    from sidecar.core.apps import AppService
    from sidecar.core.oauth_models import Grant

    clock = FakeClock(1_800_000_000)
    apps = AppService(store, clock)
    app = apps.register(
        OPERATOR,
        workspace="acme",
        name="dashboard",
        redirect_uris=["https://app.example/cb"],
        scopes=["checks:read"],
        confidential=True,
    ).app
    grant = Grant(
        "grt_1", app.id, "usr_1", "acme", frozenset({"checks:read"}), 1_799_000_000, 1_799_000_000
    )
    with store.transaction() as uow:
        uow.oauth.grants.insert(grant)
    (session,) = apps.sessions(OPERATOR, app.id)
    assert session.grant.last_used_at == 1_799_000_000  # the last refresh
    used_at = int(clock.now())
    UsageService(store, clock).report(
        OPERATOR, UsageReport("r1", (use("grt_1", 4, used_at, UseKind.OAUTH_GRANT),))
    )
    (session,) = apps.sessions(OPERATOR, app.id)
    assert session.grant.last_used_at == used_at
