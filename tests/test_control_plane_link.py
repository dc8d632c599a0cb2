"""The control-plane link (sidecar/dataplane/link.py): the sidecar's calls to the control plane
(replication stream, audit shipping, usage reports) made by a child process. Real control
planes, real sidecars, real link processes; kill -9 is real."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import replication_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import replication_pb2_grpc as pb_grpc
from sidecar.auditship import GrpcTransport, TransportError
from sidecar.config import ConfigError, load_sidecar_settings
from sidecar.core.models import Minted, RequestContext
from sidecar.core.usage import CredentialUse, UsageReport, UseKind
from sidecar.dataplane.link import Kind, Link, LinkError, encode, read_frame
from sidecar.dataplane.process import Sidecar
from sidecar.usage import GrpcUsageTransport
from sidecar.usage.transport import UsageTransportError
from tests.conftest import RunningControlPlane, wait_until
from tests.support.sync import TEST_SYNC_TOKEN
from tests.test_audit_e2e import trail_decisions
from tests.test_sync_failover import allowed, check


def _reader_key(cp: RunningControlPlane) -> tuple[RequestContext, Minted]:
    """The operator, and a key it minted for acme with checks:read."""
    operator = RequestContext(cp.plane.keys.authenticate(cp.operator_key), "req-link-test")
    return operator, cp.plane.keys.create(
        operator, workspace="acme", name="k", scopes=["checks:read"]
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill 0: it has exited if its state says so.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_the_sidecar_streams_through_a_child_process_and_revocations_arrive(
    control_plane: RunningControlPlane, sidecar_factory: object
) -> None:
    sc: Sidecar = sidecar_factory()  # type: ignore[operator]
    assert sc.link is not None and sc.link.pid is not None
    assert sc.link.pid != os.getpid()
    operator, minted = _reader_key(control_plane)
    wait_until(lambda: allowed(sc, minted.secret))
    control_plane.plane.keys.revoke(operator, minted.key.id, reason="leaked")
    wait_until(lambda: not allowed(sc, minted.secret), timeout=5)
    assert sc.sync.connected and sc.link.starts == 1


def test_a_killed_link_fails_safe_and_is_replaced(
    control_plane: RunningControlPlane, sidecar_factory: object
) -> None:
    operator, kept = _reader_key(control_plane)
    sc: Sidecar = sidecar_factory()  # type: ignore[operator]
    wait_until(lambda: sc.sync.connected and allowed(sc, kept.secret))
    assert sc.link is not None
    first = sc.link.pid
    assert first is not None
    reconnects = sc.sync.reconnects

    os.kill(first, signal.SIGKILL)
    # The open call ends UNAVAILABLE; the replica keeps deciding meanwhile.
    wait_until(lambda: sc.sync.reconnects > reconnects)
    assert allowed(sc, kept.secret) and sc.ready()
    # A new link process, and changes flow through it.
    wait_until(lambda: sc.sync.connected and sc.link is not None and sc.link.starts == 2)
    assert sc.link.pid not in (None, first)
    control_plane.plane.keys.revoke(operator, kept.key.id)
    wait_until(lambda: not allowed(sc, kept.secret), timeout=5)


def test_the_link_exits_when_the_sidecar_is_killed(tmp_path: Path) -> None:
    # A process holding a Link (its link started by one call) is killed with -9: the link
    # sees its socket close and exits, leaving nothing behind.
    script = textwrap.dedent(
        """
        import sys, time
        from sidecar.dataplane.link import Link
        link = Link()
        link.channel("127.0.0.1:9").unary_stream("/x.Y/Z")(b"")
        print(link.pid, flush=True)
        time.sleep(3600)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    ) as holder:
        try:
            assert holder.stdout is not None
            link_pid = int(holder.stdout.readline())
            assert _alive(link_pid)
        finally:
            holder.kill()
            holder.wait()
    wait_until(lambda: not _alive(link_pid), timeout=10)


def test_cancel_ends_the_call_here_and_in_the_link(control_plane: RunningControlPlane) -> None:
    link = Link()
    try:
        stub = pb_grpc.ReplicationServiceStub(link.channel(control_plane.address))
        call = stub.Subscribe(
            pb.SubscribeRequest(sidecar_id="link-test"),
            metadata=(("authorization", f"Bearer {TEST_SYNC_TOKEN}"),),
        )
        first = next(call)
        assert first.WhichOneof("event") == "snapshot"
        assert call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)  # what had arrived is dropped: the end at once
        assert err.value.code() is grpc.StatusCode.CANCELLED
        # The link acknowledges: the call is forgotten, no cancelled call outstanding.
        wait_until(lambda: not link._calls)
    finally:
        link.close()


def test_the_control_plane_status_comes_through_unchanged(
    control_plane: RunningControlPlane,
) -> None:
    link = Link()
    try:
        stub = pb_grpc.ReplicationServiceStub(link.channel(control_plane.address))
        call = stub.Subscribe(
            pb.SubscribeRequest(), metadata=(("authorization", "Bearer not-the-token"),)
        )
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        with grpc.insecure_channel(control_plane.address) as channel:
            direct = pb_grpc.ReplicationServiceStub(channel).Subscribe(
                pb.SubscribeRequest(), metadata=(("authorization", "Bearer not-the-token"),)
            )
            with pytest.raises(grpc.RpcError) as want:
                next(direct)
        assert err.value.code() is want.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        link.close()


def test_a_closed_link_answers_unavailable_without_a_process() -> None:
    link = Link()
    link.close()
    call = link.channel("127.0.0.1:9").unary_stream("/x.Y/Z")(b"")
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert link.starts == 0


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"\x00\x00\x00\x05\x63\x00\x00\x00\x01", "unknown frame kind 99"),
        (b"\x00\x00\x00\x02\x04\x00\x00\x00\x01", "frame length 2 out of range"),
        (b"\x7f\xff\xff\xff\x04\x00\x00\x00\x01", "out of range"),
        (encode(Kind.MESSAGE, 1, b"abcdef")[:-2], "stream ended inside a frame"),
        (b"\x00\x00", "stream ended inside a frame"),
    ],
)
def test_malformed_frames_are_errors_not_skips(raw: bytes, needle: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(raw)
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(LinkError, match=needle):
            read_frame(ours)


def test_frames_round_trip_and_a_clean_end_is_none() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        big = os.urandom(3 << 20)  # larger than one recv and than the socket's buffer

        def write() -> None:
            theirs.sendall(encode(Kind.MESSAGE, 7, big) + encode(Kind.END, 7, b"{}"))
            theirs.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write)
        writer.start()
        assert read_frame(ours) == (Kind.MESSAGE, 7, big)
        assert read_frame(ours) == (Kind.END, 7, b"{}")
        assert read_frame(ours) is None
        writer.join()


def test_a_stuck_link_is_replaced_on_the_next_call(control_plane: RunningControlPlane) -> None:
    # A link that stops answering (SIGSTOP: frozen, not dead) keeps a cancelled call open;
    # past the grace the next call starts a new link process.
    link = Link()
    try:
        stub = pb_grpc.ReplicationServiceStub(link.channel(control_plane.address))
        md = (("authorization", f"Bearer {TEST_SYNC_TOKEN}"),)
        call = stub.Subscribe(pb.SubscribeRequest(sidecar_id="stuck"), metadata=md)
        next(call)
        frozen = link.pid
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        call.cancel()
        cancelled = next(iter(link._calls.values()))
        assert cancelled.cancelled_at is not None
        cancelled.cancelled_at -= 60  # as if the grace had passed (time is not slept away)
        again = stub.Subscribe(pb.SubscribeRequest(sidecar_id="stuck"), metadata=md)
        assert next(again).WhichOneof("event") == "snapshot"
        assert link.starts == 2 and link.pid != frozen
        wait_until(lambda: not _alive(frozen))
    finally:
        link.close()


def test_the_setting_names_itself_when_wrong() -> None:
    with pytest.raises(ConfigError, match=r"control_plane_link: expected process\|inprocess"):
        load_sidecar_settings({"control_plane_link": "thread"}, environ={})
    assert load_sidecar_settings({}, environ={}).control_plane_link == "process"


def test_inprocess_keeps_the_stream_in_the_sidecar(sidecar_factory: object) -> None:
    sc: Sidecar = sidecar_factory(control_plane_link="inprocess")  # type: ignore[operator]
    assert sc.link is None
    wait_until(lambda: sc.sync.connected)


def test_the_link_ignores_a_group_sigterm_and_exits_with_its_sidecar(
    control_plane: RunningControlPlane,
) -> None:
    # SIGTERM to the process group (systemd, a terminal) reaches the link too: the sidecar is
    # draining then, and decides when the link goes (by closing its socket).
    link = Link()
    stub = pb_grpc.ReplicationServiceStub(link.channel(control_plane.address))
    md = (("authorization", f"Bearer {TEST_SYNC_TOKEN}"),)
    try:
        first = stub.Subscribe(pb.SubscribeRequest(sidecar_id="group"), metadata=md)
        next(first)
        pid = link.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        again = stub.Subscribe(pb.SubscribeRequest(sidecar_id="group"), metadata=md)
        assert next(again).WhichOneof("event") == "snapshot"
        assert link.pid == pid and link.starts == 1
    finally:
        link.close()
    wait_until(lambda: not _alive(pid))


def _decision_id(sc: Sidecar, key: str) -> str:
    resp = check(sc, key)
    assert resp.status.code == 0
    return str(resp.dynamic_metadata.fields["decision_id"].string_value)


def test_decision_records_ship_through_the_link_and_past_a_killed_one(
    control_plane: RunningControlPlane, sidecar_factory: object
) -> None:
    _, minted = _reader_key(control_plane)
    sc: Sidecar = sidecar_factory()  # type: ignore[operator]
    assert sc.audit is not None and sc.link is not None
    wait_until(lambda: allowed(sc, minted.secret))
    before = [_decision_id(sc, minted.secret) for _ in range(5)]
    wait_until(lambda: set(before) <= set(trail_decisions(control_plane.plane)))
    first = sc.link.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    after = [_decision_id(sc, minted.secret) for _ in range(5)]
    wait_until(lambda: set(after) <= set(trail_decisions(control_plane.plane)), timeout=20)
    counts = trail_decisions(control_plane.plane)
    assert all(counts[d] == 1 for d in before + after)
    assert sc.link.starts >= 2


def test_unary_and_client_stream_statuses_come_through_unchanged(
    control_plane: RunningControlPlane,
) -> None:
    link = Link()
    report = UsageReport("rep_link_test", (CredentialUse("key_x", UseKind.API_KEY, 1, 1),))
    try:
        for token in ("not-the-token", TEST_SYNC_TOKEN):
            via = GrpcUsageTransport(control_plane.address, token, channel_factory=link.channel)
            direct = GrpcUsageTransport(control_plane.address, token)
            outcomes = []
            for transport in (via, direct):
                try:
                    transport.send(report)
                    outcomes.append("ok")
                except UsageTransportError as exc:
                    outcomes.append(str(exc))
                transport.close()
            assert outcomes[0] == outcomes[1], outcomes
        assert "UNAUTHENTICATED" in outcomes[0] or outcomes[0] == "ok"
        ingest = GrpcTransport(control_plane.address, "not-the-token", channel_factory=link.channel)
        with pytest.raises(TransportError, match="UNAUTHENTICATED") as info:
            ingest.send([b"\x0a\x01x"])
        assert not info.value.rejected
        assert link.starts == 1
    finally:
        link.close()


def test_the_link_carries_no_secret_in_its_command_line_or_environment(
    control_plane: RunningControlPlane,
    sidecar_factory: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another local user (or a crash reporter) reads a process's command line; its environment
    # goes wherever the process's does. The sidecar's secrets reach the link over the socket.
    planted = "spauth-env-secret-0123456789abcdef"
    monkeypatch.setenv("SPAUTH_SIDECAR_SYNC_TOKEN", planted)
    sc: Sidecar = sidecar_factory()  # type: ignore[operator]
    wait_until(lambda: sc.sync.connected)
    assert sc.link is not None and sc.link.pid is not None
    cmdline = Path(f"/proc/{sc.link.pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{sc.link.pid}/environ").read_bytes()
    assert cmdline.split(b"\0")[1:3] == [b"-m", b"sidecar.dataplane.link"]
    for secret in (TEST_SYNC_TOKEN, planted):
        assert secret.encode() not in cmdline
        assert secret.encode() not in environ
    assert b"SPAUTH_" not in environ


def test_the_link_runs_with_its_allocator_settings_unless_the_operator_set_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two arenas and a fixed mmap threshold keep the link's heap small (MALLOC_ENV); a value
    # the operator exported for the pod is theirs.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    link = Link()
    try:
        link.channel("127.0.0.1:9").unary_stream("/x.Y/Z")(b"")
        assert link.pid is not None
        environ = Path(f"/proc/{link.pid}/environ").read_bytes().split(b"\0")
        assert b"MALLOC_ARENA_MAX=4" in environ
        assert b"MALLOC_MMAP_THRESHOLD_=131072" in environ
    finally:
        link.close()
