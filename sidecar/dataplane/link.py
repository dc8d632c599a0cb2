"""The control-plane link: the sidecar's gRPC calls to the control plane made by a child process.

gRPC's pollers are shared by a process: while the serving process has a client call open (the
replication stream always; an audit shipment or usage report while it runs), an incoming Check
often wakes that call's polling thread first, which then hands the request to the server's.
Measured with ``python -m bench.wakeups`` (docs/performance.md, "The control-plane link"),
the held replication stream alone was ≈ 2.5 of the sidecar's extra context switches per check.
Here the calls are made by a child process (``python -m sidecar.dataplane.link FD``); the
sidecar talks to it over a socketpair, read by a plain thread that wakes only when the control
plane sends something.

The sidecar side is a channel look-alike (:class:`LinkChannel`) with the three kinds of call the
stubs use — server-streaming (replication), client-streaming (audit ingest) and unary (usage
reports) — so :class:`~sidecar.replication.client.SyncClient` and the two transports keep every
rule they have (resume, failover, silence watchdog, retries, acknowledgements). A dead link ends
its open calls ``UNAVAILABLE``; the callers then retry as after any lost connection, and the
next call starts a new link process. The child exits when the sidecar's end of the socket
closes, so a sidecar killed with ``-9`` leaves no link behind.

Frames, both ways: a 4-byte big-endian length, then a one-byte :class:`Kind`, a 4-byte call id
and the body. An unknown kind is an error that closes the link, never a skip.

Flow control, per call, as HTTP/2's (RFC 9113 §5.2): each call opens with a window (``window``
in its OPEN, :data:`WINDOW` bytes by default) and the link never has more than that many bytes
of a call's messages sent and not yet taken by its consumer here — except one message, which
may always be sent when nothing of the call is outstanding. The consumer hands bytes back with
WINDOW frames as it takes messages. A consumer that stops taking (a replica applying a snapshot
slowly) thus stops its call's link thread, which stops reading its gRPC stream: gRPC's own flow
control then holds the control plane. The shared socket never fills, so the one reader thread
here keeps every other call's messages, ends and cancels moving. A link that overruns a window
is broken: the link is closed.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger("sidecar.link")

_HEAD = struct.Struct(">IBI")  # length of (kind + id + body), kind, call id
MAX_FRAME = 64 << 20  # a snapshot chunk is far smaller; larger is a broken peer
# A call cancelled by the sidecar that the link has not ended within this many seconds means a
# stuck link process: the next call replaces it.
CANCEL_GRACE = 2.0
# Bytes of one call's messages the link may have sent and the consumer here not yet taken: four
# of the control plane's 1 MiB snapshot chunks in flight, enough to keep the stream moving.
WINDOW = 4 << 20
_CREDIT = struct.Struct(">I")


class Kind(enum.IntEnum):
    """What a frame carries."""

    HELLO = 1  # sidecar → link: JSON {"tls": {ca, key, cert} (latin-1) | null, "options": [...]}
    # sidecar → link: JSON {"target", "method", "metadata", "shape", "timeout"} NUL request bytes
    # (empty for a client stream, whose requests follow as MESSAGE frames, then HALF_CLOSE)
    OPEN = 2
    CANCEL = 3  # sidecar → link: empty
    MESSAGE = 4  # either way: one message, serialized
    END = 5  # link → sidecar: JSON {"code": name, "details": str}
    HALF_CLOSE = 6  # sidecar → link: a client stream's last request was sent
    WINDOW = 7  # sidecar → link: 4-byte big-endian count of a call's bytes the consumer took


class LinkError(Exception):
    """A malformed frame: the link is closed."""


def encode(kind: Kind, call: int, body: bytes = b"") -> bytes:
    """One frame."""
    return _HEAD.pack(5 + len(body), kind, call) + body


def read_frame(sock: socket.socket) -> tuple[Kind, int, bytes] | None:
    """The next frame, or None at a clean end of stream."""
    head = _read_exactly(sock, _HEAD.size)
    if head is None:
        return None
    length, kind, call = _HEAD.unpack(head)
    if not 5 <= length <= MAX_FRAME:
        raise LinkError(f"frame length {length} out of range")
    try:
        known = Kind(kind)
    except ValueError:
        raise LinkError(f"unknown frame kind {kind}") from None
    body = _read_exactly(sock, length - 5)
    if body is None:
        raise LinkError("stream ended inside a frame")
    return known, call, body


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            if chunks:
                raise LinkError("stream ended inside a frame")
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class TlsFiles:
    """What ``grpc.ssl_channel_credentials`` takes, read by the sidecar at start-up."""

    root_certificates: bytes
    private_key: bytes | None = None
    certificate_chain: bytes | None = None


class LinkRpcError(grpc.RpcError):
    """How a call through the link ended, with the code and details the link reported."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_CODES = {code.name: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class _End:
    code: grpc.StatusCode
    details: str


class LinkCall:
    """A call through the link: iterate a server stream's responses, or take a unary response
    with ``result()``; ``cancel()`` ends it."""

    def __init__(
        self, link: Link, call_id: int, deserialize: Callable[[bytes], Any] | None, window: int
    ) -> None:
        self._link = link
        self.id = call_id
        self._deserialize = deserialize
        self.inbox: queue.SimpleQueue[bytes | _End] = queue.SimpleQueue()
        self.cancelled_at: float | None = None
        self.ended = False
        self.sock: socket.socket | None = None  # the link process it was sent to
        self.window = window
        # Under the link's flow lock: bytes in the inbox, and bytes taken from it that the link
        # has not been told of yet.
        self.buffered = 0
        self.untold = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.ended:
            raise StopIteration
        item = self.inbox.get()
        if isinstance(item, bytes):
            self._link.taken(self, len(item))
            return item if self._deserialize is None else self._deserialize(item)
        self.ended = True  # the link forgot the call when it ended it (or when it went)
        if item.code is grpc.StatusCode.OK:
            raise StopIteration
        raise LinkRpcError(item.code, item.details)

    def cancel(self) -> bool:
        """End the call here at once (its iterator raises CANCELLED, what had arrived is
        dropped) and ask the link to."""
        if self.cancelled_at is not None or self.ended or not self._link.drop(self):
            return False
        self._link.send(self, Kind.CANCEL)
        return True

    def result(self, timeout: float | None) -> Any:
        """The one response of a unary-response call, or its status raised. The link enforces
        ``timeout`` with gRPC's deadline; a link that does not answer within it (and a grace)
        gets the call cancelled here, ``DEADLINE_EXCEEDED``."""
        wait = None if timeout is None else timeout + CANCEL_GRACE
        try:
            item = self.inbox.get(timeout=wait)
        except queue.Empty:
            self.cancel()
            raise LinkRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the link did not answer"
            ) from None
        if isinstance(item, bytes):
            self._link.taken(self, len(item))
            response = item if self._deserialize is None else self._deserialize(item)
            with contextlib.suppress(StopIteration):
                next(self)  # the END after the response: OK, or how the call failed after all
            return response
        self.ended = True
        if item.code is grpc.StatusCode.OK:  # a link that ended a unary call without its answer
            raise LinkRpcError(grpc.StatusCode.INTERNAL, "the call ended without a response")
        raise LinkRpcError(item.code, item.details)


def _serialized(serializer: Callable[[Any], bytes] | None, request: Any) -> bytes:
    """A request as grpc would send it: its serializer's bytes, or the bytes given."""
    return request if serializer is None else serializer(request)


class LinkChannel:
    """What the sidecar's stubs need of a ``grpc.Channel`` (server-streaming, unary and
    client-streaming calls), carried by the link."""

    def __init__(self, link: Link, target: str) -> None:
        self._link = link
        self._target = target

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **_options: object,
    ) -> Callable[..., LinkCall]:
        def call(
            request: Any,
            timeout: float | None = None,
            metadata: Sequence[tuple[str, str]] | None = None,
            **_kwargs: object,
        ) -> LinkCall:
            return self._link.open(self._target, method, metadata or (),
                                   _serialized(request_serializer, request),
                                   response_deserializer, "unary_stream", timeout)  # fmt: skip

        return call

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **_options: object,
    ) -> Callable[..., Any]:
        def call(
            request: Any,
            timeout: float | None = None,
            metadata: Sequence[tuple[str, str]] | None = None,
            **_kwargs: object,
        ) -> Any:
            pending = self._link.open(self._target, method, metadata or (),
                                      _serialized(request_serializer, request),
                                      response_deserializer, "unary_unary", timeout)  # fmt: skip
            return pending.result(timeout)

        return call

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **_options: object,
    ) -> Callable[..., Any]:
        def call(
            requests: Iterable[Any],
            timeout: float | None = None,
            metadata: Sequence[tuple[str, str]] | None = None,
            **_kwargs: object,
        ) -> Any:
            pending = self._link.open(self._target, method, metadata or (), b"",
                                      response_deserializer, "stream_unary", timeout)  # fmt: skip
            for request in requests:
                self._link.send(pending, Kind.MESSAGE, _serialized(request_serializer, request))
            self._link.send(pending, Kind.HALF_CLOSE)
            return pending.result(timeout)

        return call

    def close(self) -> None:
        """Nothing to release: the link process outlives a channel."""

    def __enter__(self) -> LinkChannel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Link:
    """The sidecar's side: starts the link process on the first call (and again after it died),
    reads its frames on a thread of its own, and ends every open call when it goes."""

    def __init__(
        self,
        tls: TlsFiles | None = None,
        options: Sequence[tuple[str, str]] = (),
        *,
        python: str = sys.executable,
        window: int = WINDOW,
    ) -> None:
        hello = {
            "tls": None
            if tls is None
            else {
                "ca": tls.root_certificates.decode("latin-1"),
                "key": None if tls.private_key is None else tls.private_key.decode("latin-1"),
                "cert": None
                if tls.certificate_chain is None
                else tls.certificate_chain.decode("latin-1"),
            },
            "options": [list(o) for o in options],
        }
        self._hello = json.dumps(hello).encode()
        self._python = python
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._calls: dict[int, LinkCall] = {}
        self._next_id = 1
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self.starts = 0  # link processes started (the first, then one per replacement)
        self.window = window
        # Bytes of the calls' messages received and not yet taken by their consumers, now and
        # at most (under _flow, which the reader and the consumers share).
        self._flow = threading.Lock()
        self.buffered_bytes = 0
        self.peak_buffered_bytes = 0

    @property
    def pid(self) -> int | None:
        """The running link process's pid, if any."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def channel(self, target: str) -> grpc.Channel:
        """A channel to ``target`` through the link (typed as what the stubs accept)."""
        return LinkChannel(self, target)  # type: ignore[return-value]

    def open(
        self,
        target: str,
        method: str,
        metadata: Sequence[tuple[str, str]],
        request: bytes,
        deserialize: Callable[[bytes], Any] | None,
        shape: str = "unary_stream",
        timeout: float | None = None,
    ) -> LinkCall:
        """Start a call (``shape`` is grpc's name for it); a link that cannot start ends it
        UNAVAILABLE."""
        with self._lock:
            call = LinkCall(self, self._next_id, deserialize, self.window)
            self._next_id += 1
            if self._closed:
                call.inbox.put(_End(grpc.StatusCode.UNAVAILABLE, "link closed"))
                return call
            try:
                self._ensure_running()
            except OSError as exc:
                call.inbox.put(_End(grpc.StatusCode.UNAVAILABLE, f"link did not start: {exc}"))
                return call
            call.sock = self._sock
            self._calls[call.id] = call
        head = json.dumps(
            {"target": target, "method": method, "metadata": list(metadata), "shape": shape,
             "timeout": timeout, "window": call.window}
        )  # fmt: skip
        self.send(call, Kind.OPEN, head.encode() + b"\0" + request)
        return call

    def send(self, call: LinkCall, kind: Kind, body: bytes = b"") -> None:
        """Write one frame of ``call`` to the link process it went to; a broken link shows up
        on the reader, which ends the calls."""
        if call.sock is None:
            return
        with self._send_lock, contextlib.suppress(OSError):
            call.sock.sendall(encode(kind, call.id, body))

    def taken(self, call: LinkCall, size: int) -> None:
        """The consumer took ``size`` bytes of ``call``'s messages: tell the link once a
        quarter of the window is taken, or the inbox is empty (so a link waiting to send one
        more message than fits is never left waiting on bytes already taken)."""
        with self._flow:
            call.buffered -= size
            self.buffered_bytes -= size
            call.untold += size
            if call.untold < call.window // 4 and not call.inbox.empty():
                return
            credit, call.untold = call.untold, 0
        self.send(call, Kind.WINDOW, _CREDIT.pack(credit))

    def drop(self, call: LinkCall) -> bool:
        """Cancel ``call`` here: what it had received is dropped and its end is CANCELLED;
        False when the link had already ended it."""
        with self._flow:
            items: list[bytes | _End] = []
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(call.inbox.get_nowait())
            dropped = sum(len(item) for item in items if isinstance(item, bytes))
            call.buffered -= dropped
            self.buffered_bytes -= dropped
            if items and isinstance(items[-1], _End):
                call.inbox.put(items[-1])
                return False
            call.cancelled_at = time.monotonic()
            call.inbox.put(_End(grpc.StatusCode.CANCELLED, "cancelled by the sidecar"))
        return True

    def _deliver(self, call: LinkCall, body: bytes) -> None:
        """A message for ``call`` from the reader: into its inbox, unless cancelled here. A
        message beyond the call's window is a broken link."""
        with self._flow:
            if call.cancelled_at is not None:
                return
            if call.buffered and call.buffered + len(body) > call.window:
                raise LinkError(f"the link overran the window of call {call.id}")
            call.buffered += len(body)
            self.buffered_bytes += len(body)
            self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)
            call.inbox.put(body)

    def forget(self, call_id: int) -> None:
        with self._lock:
            self._calls.pop(call_id, None)

    def _ensure_running(self) -> None:
        """Under the lock: a live, responsive link process (a new one if needed)."""
        if self._proc is not None and self._proc.poll() is None and not self._stuck():
            return
        self._stop_process()
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [self._python, "-m", "sidecar.dataplane.link", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=_link_environment(),
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self.starts += 1
        ours.sendall(encode(Kind.HELLO, 0, self._hello))
        threading.Thread(target=self._read, args=(ours,), name="spauth-link", daemon=True).start()
        log.info("control-plane link started", extra={"pid": self._proc.pid})

    def _stuck(self) -> bool:
        now = time.monotonic()
        return any(
            c.cancelled_at is not None and now - c.cancelled_at > CANCEL_GRACE
            for c in self._calls.values()
        )

    def _stop_process(self) -> None:
        sock, proc = self._sock, self._proc
        self._sock = self._proc = None
        if sock is not None:
            # The link exits at end of stream; the reader wakes, ends that link's calls and
            # closes the socket (closing it here would leave the reader blocked on a number
            # the next socket may reuse).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if proc is not None:
            try:
                proc.wait(1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _read(self, sock: socket.socket) -> None:
        """Dispatch the link's frames to their calls until it goes; then end what is open."""
        reason = "link process exited"
        try:
            while (frame := read_frame(sock)) is not None:
                kind, call_id, body = frame
                with self._lock:
                    call = self._calls.get(call_id)
                if kind is Kind.END:
                    self._end(call, body)
                elif kind is Kind.MESSAGE and call is not None:
                    self._deliver(call, body)
                elif kind is not Kind.MESSAGE:
                    raise LinkError(f"unexpected frame {kind.name} from the link")
        except (OSError, LinkError) as exc:
            reason = f"link failed: {exc}"
            log.warning("control-plane link failed", extra={"error": str(exc)})
        with self._lock:
            if self._sock is sock:
                self._sock = None
            orphans = [c for c in self._calls.values() if c.sock is sock]
            for call in orphans:
                del self._calls[call.id]
        sock.close()
        for call in orphans:
            call.inbox.put(_End(grpc.StatusCode.UNAVAILABLE, reason))

    def _end(self, call: LinkCall | None, body: bytes) -> None:
        if call is None:
            return
        self.forget(call.id)
        try:
            fields = json.loads(body)
            end = _End(_CODES.get(fields["code"], grpc.StatusCode.UNKNOWN), str(fields["details"]))
        except (ValueError, KeyError, TypeError):
            end = _End(grpc.StatusCode.INTERNAL, "malformed end frame from the link")
        call.inbox.put(end)

    def close(self) -> None:
        """Stop the link process; open calls end UNAVAILABLE."""
        with self._lock:
            self._closed = True
            self._stop_process()


# --- the link process ---------------------------------------------------------------------


# glibc's allocator, for the link only (docs/performance.md, "The link's memory"): two arenas
# instead of one per thread (a thread per open call, and gRPC's own), and buffers from 128 KiB
# up (snapshot chunks are 1 MiB) mapped and unmapped on their own instead of the threshold
# rising after the first and their pages staying in the heap: 22 → 16 MB anonymous after a
# 100,000-key snapshot went through. An operator's own setting wins.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}


# The link's channels keep gRPC's receive window at its initial size: with BDP probing (the
# default) a snapshot arriving at loopback speed grew it, and gRPC kept the buffers: 23-32 MB
# anonymous after a 1M-key snapshot against 17-18 MB without, received as fast (0.4-0.7 s).
# The link's own window (WINDOW) is what bounds a call's bytes in flight.
CHANNEL_OPTIONS: list[tuple[str, int]] = [("grpc.http2.bdp_probe", 0)]


def _link_environment() -> dict[str, str]:
    """The link's environment: the sidecar's without its settings, plus :data:`MALLOC_ENV`.
    The link reads no setting (it is handed the TLS material and the sync token over the
    socket), and ``SPAUTH_*`` may hold a secret (``SPAUTH_SIDECAR_SYNC_TOKEN``) that a second
    process need not carry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAUTH_")}
    return {**MALLOC_ENV, **env}


class _Credit:
    """How much more of a call's messages the link may send: its window less what is
    outstanding (sent, and not yet reported taken by the sidecar's consumer)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.outstanding = 0
        self.closed = False
        self._changed = threading.Condition()

    def take(self, size: int) -> bool:
        """Wait until a message of ``size`` bytes may be sent (it fits, or nothing is
        outstanding) and count it; False once the call is cancelled."""
        with self._changed:
            while not self.closed and self.outstanding and self.outstanding + size > self.window:
                self._changed.wait()
            if self.closed:
                return False
            self.outstanding += size
            return True

    def give(self, size: int) -> None:
        with self._changed:
            self.outstanding = max(0, self.outstanding - size)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()


class _Serve:
    """The child: one channel per target, one thread per open call."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        self.calls: dict[int, Any] = {}
        self.inputs: dict[int, queue.SimpleQueue[bytes | None]] = {}  # client streams' requests
        self.credits: dict[int, _Credit] = {}
        self.channels: dict[str, grpc.Channel] = {}
        self.credentials: grpc.ChannelCredentials | None = None
        self.options: list[tuple[str, str]] = []

    def send(self, kind: Kind, call: int, body: bytes = b"") -> None:
        with self.send_lock:
            self.sock.sendall(encode(kind, call, body))

    def hello(self, body: bytes) -> None:
        fields = json.loads(body)
        tls = fields["tls"]
        if tls is not None:
            self.credentials = grpc.ssl_channel_credentials(
                root_certificates=tls["ca"].encode("latin-1"),
                private_key=None if tls["key"] is None else tls["key"].encode("latin-1"),
                certificate_chain=None if tls["cert"] is None else tls["cert"].encode("latin-1"),
            )
        self.options = [(str(k), str(v)) for k, v in fields["options"]]

    def channel(self, target: str) -> grpc.Channel:
        if target not in self.channels:
            options = [*self.options, *CHANNEL_OPTIONS]
            self.channels[target] = (
                grpc.insecure_channel(target, options)
                if self.credentials is None
                else grpc.secure_channel(target, self.credentials, options)
            )
        return self.channels[target]

    def open(self, call_id: int, body: bytes) -> None:
        head, _, request = body.partition(b"\0")
        fields = json.loads(head)
        metadata = tuple((str(k), str(v)) for k, v in fields["metadata"])
        timeout = fields.get("timeout")
        channel, method = self.channel(fields["target"]), fields["method"]
        shape = fields.get("shape", "unary_stream")
        self.credits[call_id] = _Credit(int(fields["window"]))
        if shape == "unary_stream":
            call = channel.unary_stream(method, None, None)(
                request, metadata=metadata, timeout=timeout
            )
            self.calls[call_id] = call
            threading.Thread(target=self.follow, args=(call_id, call), daemon=True).start()
            return
        if shape == "unary_unary":
            future = channel.unary_unary(method, None, None).future(
                request, metadata=metadata, timeout=timeout
            )
        elif shape == "stream_unary":
            requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
            self.inputs[call_id] = requests
            future = channel.stream_unary(method, None, None).future(
                iter(requests.get, None), metadata=metadata, timeout=timeout
            )
        else:
            raise LinkError(f"unknown call shape {shape!r}")
        self.calls[call_id] = future
        future.add_done_callback(lambda done: self.finish(call_id, done))

    def finish(self, call_id: int, future: Any) -> None:
        """A unary-response call ended: its response (if any), then its status."""
        self.calls.pop(call_id, None)
        credit = self.credits.pop(call_id)
        code, details = grpc.StatusCode.OK, ""
        try:
            response = future.result()
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        except grpc.FutureCancelledError:
            code, details = grpc.StatusCode.CANCELLED, "cancelled by the sidecar"
        end = json.dumps({"code": code.name, "details": details}).encode()
        with contextlib.suppress(OSError):  # the sidecar went: main() exits
            if code is grpc.StatusCode.OK and credit.take(len(response)):
                self.send(Kind.MESSAGE, call_id, response)
            self.send(Kind.END, call_id, end)

    def follow(self, call_id: int, call: Any) -> None:
        code, details = grpc.StatusCode.OK, ""
        credit = self.credits[call_id]
        try:
            for message in call:
                # Waiting here stops reading the stream: gRPC's flow control holds the sender.
                if credit.take(len(message)):
                    self.send(Kind.MESSAGE, call_id, message)
                del message  # not kept while the next one is awaited
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        except OSError:
            return  # the sidecar went: main() exits
        self.calls.pop(call_id, None)
        self.credits.pop(call_id, None)
        end = json.dumps({"code": code.name, "details": details}).encode()
        try:
            self.send(Kind.END, call_id, end)
        except OSError:
            return

    def run(self) -> None:
        while (frame := read_frame(self.sock)) is not None:
            kind, call_id, body = frame
            if kind is Kind.HELLO:
                self.hello(body)
            elif kind is Kind.OPEN:
                self.open(call_id, body)
            elif kind is Kind.MESSAGE:
                inbox = self.inputs.get(call_id)
                if inbox is not None:
                    inbox.put(body)
            elif kind is Kind.HALF_CLOSE:
                inbox = self.inputs.pop(call_id, None)
                if inbox is not None:
                    inbox.put(None)
            elif kind is Kind.WINDOW:
                if len(body) != _CREDIT.size:
                    raise LinkError(f"window frame of {len(body)} bytes")
                credit = self.credits.get(call_id)
                if credit is not None:  # else the call has ended meanwhile
                    credit.give(_CREDIT.unpack(body)[0])
            elif kind is Kind.CANCEL:
                credit = self.credits.get(call_id)
                if credit is not None:
                    credit.close()
                call = self.calls.get(call_id)
                if call is not None:
                    call.cancel()
                inbox = self.inputs.pop(call_id, None)
                if inbox is not None:
                    inbox.put(None)
            else:
                raise LinkError(f"unexpected frame {kind.name} from the sidecar")


def main(argv: Sequence[str]) -> int:
    """``python -m sidecar.dataplane.link FD``: serve the sidecar on socket ``FD`` until it
    closes its end."""
    # A terminal's Ctrl-C or a SIGTERM to the whole group reaches this process too: the sidecar
    # decides when it stops (it is draining meanwhile), and its socket closing ends this one.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    serve = _Serve(sock)
    try:
        serve.run()
    except (OSError, LinkError) as exc:
        print(f"spauth link: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    os._exit(code)  # open calls' threads are daemons; grpc's teardown has nothing to flush
