"""The control-plane link's flow control (sidecar/dataplane/link.py): a consumer that does not
read keeps its call's unread bytes in the sidecar within the call's window, while the other
calls through the same link start, answer and end, and a cancel still ends the stalled call.
A real gRPC server on port 0 or a real control plane, and a real link process; the bound is
read from the link's counters, never from timing."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import replication_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import replication_pb2_grpc as pb_grpc
from sidecar.auditship import GrpcTransport, TransportError
from sidecar.core.models import ApiKey
from sidecar.core.usage import CredentialUse, UsageReport, UseKind
from sidecar.dataplane.link import Link, LinkCall, LinkError
from sidecar.usage import GrpcUsageTransport
from tests.conftest import RunningControlPlane, wait_until
from tests.support.sync import TEST_SYNC_TOKEN

SERVICE = "linkflow.Test"
MESSAGE = 64 << 10
MESSAGES = 400  # 25 MiB in all: many times the window and gRPC's own buffers
WINDOW = 256 << 10


class _Server:
    """A server-streaming method that counts what it produced, a unary echo and a client
    stream that sums the lengths of what it received."""

    def __init__(self) -> None:
        self.produced = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Big": grpc.unary_stream_rpc_method_handler(self.big),
                        "Hang": grpc.unary_stream_rpc_method_handler(self.hang),
                        "Echo": grpc.unary_unary_rpc_method_handler(lambda r, _c: r),
                        "Sum": grpc.stream_unary_rpc_method_handler(self.sum),
                    },
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def big(self, request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(MESSAGES):
            self.produced = i + 1
            yield bytes([i % 256]) * MESSAGE

    @staticmethod
    def hang(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """One message, then nothing until the caller's deadline ends the call (or 20 s pass:
        then it ends OK, so a call without its deadline fails the test instead of hanging)."""
        yield b"first"
        done = threading.Event()
        context.add_callback(done.set)
        done.wait(20)

    @staticmethod
    def sum(requests: Iterable[bytes], _context: grpc.ServicerContext) -> bytes:
        return str(sum(len(r) for r in requests)).encode()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.server.stop(None)


def test_a_consumer_that_does_not_read_stays_within_its_window_and_blocks_nobody(
    server: _Server,
) -> None:
    link = Link(window=WINDOW)
    try:
        channel = link.channel(f"127.0.0.1:{server.port}")
        stalled = channel.unary_stream(f"/{SERVICE}/Big")(b"")
        assert isinstance(stalled, LinkCall)
        first = next(stalled)  # the call is open and moving; then nobody reads it
        assert first == b"\0" * MESSAGE
        # The window is full: what the link may send without hearing back has arrived.
        wait_until(lambda: stalled.buffered > WINDOW - MESSAGE)
        # Other calls through the same link and reader: a unary one, and a client stream.
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
        assert echo(b"ping", timeout=10) == b"ping"
        total = channel.stream_unary(f"/{SERVICE}/Sum")(
            (b"x" * 1000 for _ in range(50)), timeout=10
        )
        assert total == b"50000"
        # Nothing beyond the window was buffered here, and the server was held back by gRPC's
        # flow control: it has not produced the whole stream into anyone's memory.
        assert stalled.buffered <= WINDOW
        # (the stalled call's window, and one small answer at a time beside it)
        assert link.peak_buffered_bytes <= WINDOW + len(b"50000")
        assert server.produced < MESSAGES
        # A cancel ends the stalled call here and in the link (its thread was waiting for
        # window): the link forgets it.
        assert stalled.cancel()
        with pytest.raises(grpc.RpcError) as err:
            next(stalled)
        assert err.value.code() is grpc.StatusCode.CANCELLED
        wait_until(lambda: not link._calls)
        assert link.buffered_bytes == 0
        assert link.starts == 1
    finally:
        link.close()


def test_a_server_stream_through_the_link_keeps_its_deadline(server: _Server) -> None:
    """``timeout`` on a server-streaming call is the whole call's deadline, as on a grpc
    channel: the link once dropped it, and such a call waited for ever."""
    link = Link(window=WINDOW)
    try:
        call = link.channel(f"127.0.0.1:{server.port}").unary_stream(f"/{SERVICE}/Hang")(
            b"", timeout=0.5
        )
        assert next(call) == b"first"
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        link.close()


def test_a_consumer_that_reads_gets_every_message_in_order_within_the_window(
    server: _Server,
) -> None:
    link = Link(window=WINDOW)
    try:
        call = link.channel(f"127.0.0.1:{server.port}").unary_stream(f"/{SERVICE}/Big")(b"")
        seen = 0
        for i, message in enumerate(call):
            assert message == bytes([i % 256]) * MESSAGE
            assert link.buffered_bytes <= WINDOW
            seen += 1
        assert seen == MESSAGES
        assert link.peak_buffered_bytes <= WINDOW
        assert link.buffered_bytes == 0
    finally:
        link.close()


def test_a_message_may_exceed_the_window_only_when_nothing_is_outstanding(
    server: _Server,
) -> None:
    # A window smaller than one message: each message travels alone, and the stream completes.
    link = Link(window=MESSAGE // 4)
    try:
        call = link.channel(f"127.0.0.1:{server.port}").unary_stream(f"/{SERVICE}/Big")(b"")
        for _ in call:
            assert link.buffered_bytes <= MESSAGE
        assert link.peak_buffered_bytes == MESSAGE
    finally:
        link.close()


def test_a_link_that_overruns_a_window_is_broken() -> None:
    link = Link(window=100)
    call = LinkCall(link, 1, None, 100)
    link._deliver(call, b"x" * 60)
    with pytest.raises(LinkError, match="overran the window of call 1"):
        link._deliver(call, b"x" * 60)
    # One message alone may be larger than the window.
    other = LinkCall(link, 2, None, 100)
    link._deliver(other, b"x" * 500)
    assert link.buffered_bytes == 560


def test_a_cancelled_call_drops_what_it_had_and_what_still_arrives() -> None:
    link = Link(window=1000)
    call = LinkCall(link, 1, None, 1000)
    link._deliver(call, b"x" * 300)
    assert call.cancel()
    link._deliver(call, b"y" * 300)  # sent before the link saw the cancel
    assert link.buffered_bytes == 0 and call.buffered == 0
    with pytest.raises(grpc.RpcError):
        next(call)


def test_window_updates_reach_a_link_waiting_on_one_message_more(server: _Server) -> None:
    # Two consumers on one link, each taking its messages from its own thread, finish.
    link = Link(window=WINDOW)
    counts: list[int] = []
    try:
        channel = link.channel(f"127.0.0.1:{server.port}")

        def drain() -> None:
            counts.append(sum(1 for _ in channel.unary_stream(f"/{SERVICE}/Big")(b"")))

        threads = [threading.Thread(target=drain) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert counts == [MESSAGES, MESSAGES]
        assert link.peak_buffered_bytes <= 2 * WINDOW
    finally:
        link.close()


def test_a_snapshot_consumer_that_stops_holds_one_message_while_usage_and_audit_go_through(
    control_plane: RunningControlPlane,
) -> None:
    # A real control plane with 15,000 keys sends its snapshot as entries, 5,000 to a message
    # (≈ 1 MB each); the window is smaller than one, so each message travels alone. (The keys
    # expire in 90 days, outside the control plane's expiry sweeps.)
    now = int(time.time())
    with control_plane.plane.store.transaction() as uow:
        for i in range(15_000):
            uow.keys.insert(
                ApiKey(f"key_flow{i:08d}", hashlib.sha256(b"%d" % i).digest(), "abcd", "flow",
                       f"ws{i % 100}", frozenset({"checks:read"}), now, now + 90 * 86400,
                       "test")
            )  # fmt: skip
    link = Link(window=64 << 10)
    md = (("authorization", f"Bearer {TEST_SYNC_TOKEN}"),)
    try:
        stub = pb_grpc.ReplicationServiceStub(link.channel(control_plane.address))
        call = stub.Subscribe(pb.SubscribeRequest(sidecar_id="flow"), metadata=md)
        assert isinstance(call, LinkCall)
        first = next(call)
        sizes = [first.ByteSize()]
        entries = len(first.snapshot.entries)
        assert entries and not first.snapshot.complete
        wait_until(lambda: call.buffered > 0)  # the next message is here; nothing after it
        usage = GrpcUsageTransport(
            control_plane.address, TEST_SYNC_TOKEN, channel_factory=link.channel
        )
        usage.send(UsageReport("rep_flow", (CredentialUse("key_x", UseKind.API_KEY, 1, 1),)))
        ingest = GrpcTransport(control_plane.address, "not-the-token", channel_factory=link.channel)
        with pytest.raises(TransportError, match="UNAUTHENTICATED"):
            ingest.send([b"\x0a\x01x"])
        held = call.buffered
        # Taken again, the rest of the snapshot comes, every key of it, one message at a time.
        for message in call:
            sizes.append(message.ByteSize())
            entries += len(message.snapshot.entries)
            if message.snapshot.complete:
                break
        assert held == sizes[1]  # what waited was the next message alone
        assert link.peak_buffered_bytes == max(sizes)  # never two at once
        assert entries >= 15_000 and len(sizes) >= 3
        assert call.cancel()
        wait_until(lambda: not link._calls)
    finally:
        link.close()
