"""The sidecar process: a grpcio sync server (a thread pool measured faster than grpc.aio for this
workload, see docs/performance.md) serving Envoy's Check, the in-cluster AuthorizationService,
health and reflection; a replication thread; and a housekeeping thread (health, policy reload,
pruning)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar._gen.statuspulse.auth.v1 import authorization_pb2, authorization_pb2_grpc
from sidecar.auditship import AuditPipeline, GrpcTransport, ShipConfig, Transport
from sidecar.auditship.metrics import AuditMetrics
from sidecar.auditship.observer import DecisionRecorder
from sidecar.authz.engine import Engine, TokenVerifier
from sidecar.authz.policy import Policy
from sidecar.authz.policy_source import PolicyWatcher, load_policy
from sidecar.authz.replica import Replica
from sidecar.authz.token_verifier import ReplicaTokenVerifier
from sidecar.config import SidecarSettings
from sidecar.core.clock import Clock, SystemClock
from sidecar.dataplane.envoy_check import SERVICE as CHECK_SERVICE
from sidecar.dataplane.envoy_check import CheckHandler, Observer, check_method, raw_check_method
from sidecar.dataplane.fastcheck import check_path
from sidecar.dataplane.incluster import AuthorizationServicer
from sidecar.dataplane.link import Link, TlsFiles
from sidecar.ops.denial_log import DenialLog
from sidecar.ops.health import Health, Status
from sidecar.ops.metrics import DecisionMetrics, Metrics
from sidecar.ops.secrets_files import sidecar_sync_token
from sidecar.ops.status_server import StatusServer
from sidecar.ops.tls import sync_channel_credentials, sync_channel_options, sync_tls_files
from sidecar.ops.tracing import CheckFn, span_annotator, start_tracing, traced_check
from sidecar.ratelimit import AbuseLimits, WindowRateLimiter
from sidecar.replication.client import SyncClient
from sidecar.usage import GrpcUsageTransport, UsageReporter, UsageTally
from sidecar.usage.metrics import UsageMetrics

if TYPE_CHECKING:
    from sidecar.ratelimit.shared import RedisLimitSync

log = logging.getLogger("sidecar.server")

AUTHZ_SERVICE = authorization_pb2.DESCRIPTOR.services_by_name["AuthorizationService"].full_name
# SERVING while connected to the control plane; NOT_SERVING = degraded (serving from a replica
# that is no longer updated, until max_staleness).
SYNC_HEALTH = "statuspulse.auth.v1.ReplicaSync"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TICK = 0.25  # housekeeping period, seconds


class _LiveHealth(health.HealthServicer):
    """grpc.health.v1 whose Check recomputes the state first, so a probe never sees a status
    older than /readyz's (Envoy's health checker remembers a NOT_SERVING on first contact).
    Watch streams follow the housekeeping updates."""

    def __init__(self, refresh: Callable[[], None]) -> None:
        super().__init__()
        self._refresh = refresh

    def Check(self, request: object, context: grpc.ServicerContext) -> object:
        self._refresh()
        return super().Check(request, context)


class Sidecar:
    """One sidecar process. ``start()`` binds and begins syncing; ``stop()`` drains."""

    def __init__(
        self,
        settings: SidecarSettings,
        clock: Clock | None = None,
        *,
        token_verifier: TokenVerifier | None = None,
        policy: Policy | None = None,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        # SO_REUSEPORT only for the workers of `--workers N`: otherwise a stale or second
        # sidecar on the same port would silently take a share of the connections instead of
        # failing to start.
        self.reuse_port = reuse_port
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self.metrics.sidecar_metrics()
        self.replica = Replica()
        self.limiter = WindowRateLimiter(
            AbuseLimits(
                source_failures=settings.failure_limit_source,
                key_failures=settings.failure_limit_key,
                failure_window=settings.failure_window,
            )
        )
        self.limit_sync = _limit_sync(settings, self.limiter, self.clock)
        self.engine = Engine(
            self.replica,
            policy or load_policy(settings.policy_file),
            self.clock,
            max_staleness=settings.max_staleness,
            token_verifier=token_verifier
            or ReplicaTokenVerifier(
                settings.oauth_issuer,
                settings.oauth_audience,
                max_lifetime=settings.oauth_access_token_ttl,
            ),
            limiter=self.limiter,
            token_cache_size=settings.token_cache_size,
        )
        self.decision_metrics = DecisionMetrics(self.metrics)
        # Lines written by a thread of their own: never formatted or written on an RPC thread.
        self.denial_log = DenialLog(settings.denial_log_rate, background=True)
        # Called after every decision, on the RPC thread: keep each one to microseconds.
        self.observers: list[Observer] = [self.decision_metrics, self.denial_log]
        # Read once: replication, audit shipping and usage reports all present this token.
        sync_token = sidecar_sync_token(settings)
        # The calls to the control plane made by a child process (docs/performance.md, "The
        # control-plane link"): a client call held here shares gRPC's pollers with the Check
        # server.
        self.link = _control_plane_link(settings)
        channels = None if self.link is None else self.link.channel
        self.audit = _audit_pipeline(settings, sync_token, channels)
        if self.audit is not None:
            self.observers.append(DecisionRecorder(self.audit, self.clock))
            self.metrics.registry.register(AuditMetrics(self.audit))
        self.usage = _usage_reporter(settings, self.clock, sync_token, channels)
        if self.usage is not None:
            self.observers.append(self.usage.tally)
            self.metrics.registry.register(UsageMetrics(self.usage))
        self.check = CheckHandler(
            self.engine,
            self.observers,
            self.decision_metrics.error,
            failure_window=settings.failure_window,
        )
        self.sync = SyncClient(
            self.replica,
            settings.control_plane,
            self.clock,
            state_dir=settings.state_dir,
            sync_token=sync_token,
            credentials=sync_channel_credentials(settings),
            channel_options=sync_channel_options(settings),
            channel_factory=channels,
        )
        self.policy_watcher = PolicyWatcher(
            settings.policy_file, self._set_policy, self._policy_reloaded
        )
        self.tracing = start_tracing(
            settings.tracing_endpoint, "spauth-sidecar", settings.tracing_sample_ratio
        )
        if self.tracing is not None:
            self.observers.append(span_annotator())
        # The compiled Check path (docs/performance.md) when asked for and built; tracing
        # wraps the parsed-request handler, so a traced sidecar keeps the Python path.
        wanted = settings.check_path if self.tracing is None else "python"
        self.check_path, self.fast_check = check_path(self.check, wanted)
        self.status_server = (
            StatusServer(settings.metrics_addr, self.metrics.registry, self.health_report)
            if settings.metrics_addr
            else None
        )
        # Run at the end of stop(), after in-flight checks drained (e.g. flush the audit queue).
        self.closers: list[Callable[[], None]] = []
        self.health = _LiveHealth(self._update_health)
        self._server: grpc.Server | None = None
        self._stop = threading.Event()
        self._housekeeper = threading.Thread(
            target=self._housekeeping, name="spauth-housekeeping", daemon=True
        )
        self.port = 0
        self._draining = False
        self._syncing = False
        self._started_at = self.clock.now()
        self._reconnects_seen = 0
        self._unknown_seen: dict[str, int] = {}
        self._last_status: Status | None = None
        self._health_lock = threading.Lock()
        self.metrics.replica_revision.set_function(lambda: self.replica.revision)
        self.metrics.replica_staleness.set_function(self.staleness)

    def _set_policy(self, policy: Policy) -> None:
        self.engine.policy = policy

    def _policy_reloaded(self, result: str) -> None:
        self.metrics.policy_reloads.labels(result).inc()

    def staleness(self) -> float:
        """Seconds since the replica last heard from the control plane (or since start)."""
        last = self.replica.last_contact or self._started_at
        return max(0.0, self.clock.now() - last)

    def _check_method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:  # type: ignore[type-arg]
        """Envoy's Check: the handler (which counts its own gRPC errors), traced when tracing
        is on."""
        if self.fast_check is not None:
            return {"Check": raw_check_method(self.fast_check)}
        check: CheckFn = self.check
        if self.tracing is not None:
            check = traced_check(check, self.tracing)
        return {"Check": check_method(check)}

    def start(self) -> None:
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.settings.threads, thread_name_prefix="spauth-rpc"),
            options=[("grpc.so_reuseport", int(self.reuse_port))],
        )
        check = self._check_method_handlers()
        # Registered, as generated code does: the core matches the method itself and the call
        # skips the Python-side lookup through every generic handler.
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(CHECK_SERVICE, check),)
        )
        server.add_registered_method_handlers(CHECK_SERVICE, check)  # type: ignore[attr-defined]
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(
            AuthorizationServicer(self.engine, self.observers), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (CHECK_SERVICE, AUTHZ_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            self.port = server.add_insecure_port(self.settings.listen)
        except RuntimeError:  # grpcio raises when the address is taken
            self.port = 0
        if self.port == 0:
            raise OSError(f"listen: cannot listen on {self.settings.listen}")
        if self.status_server is not None:
            try:
                self.status_server.start()  # first: probes see NOT_SERVING while loading
            except OSError:
                server.stop(None)
                raise
        self._update_health()
        self.sync.start()
        if self.limit_sync is not None:
            self.limit_sync.start()
        if self.audit is not None:
            self.audit.start()
        if self.usage is not None:
            self.usage.start()
        self.denial_log.start()
        self._syncing = True
        server.start()
        self._server = server
        self._update_health()
        self._housekeeper.start()
        log.info(
            "sidecar listening",
            extra={"listen": self.settings.listen, "control_plane": self.settings.control_plane},
        )

    def health_report(self) -> Health:
        """NOT_SERVING while loading, past max_staleness or draining (checks fail closed or are
        about to stop); DEGRADED while answering from a replica the control plane no longer
        updates; SERVING otherwise."""
        if self._draining:
            return Health(Status.NOT_SERVING, ("draining",))
        unready = self.engine.unready(self.clock.now())
        if unready is not None:
            return Health(Status.NOT_SERVING, (unready.value,))
        reasons = []
        if not self.sync.connected:
            reasons.append("control_plane_unreachable")
        if self.replica.unknown_kinds:
            # A newer control plane sent a change this sidecar cannot apply: upgrade it.
            reasons.append("unknown_change_kind")
        if reasons:
            return Health(Status.DEGRADED, tuple(reasons))
        return Health(Status.SERVING)

    def ready(self) -> bool:
        """Whether checks are decided from a usable replica (else they fail closed)."""
        return self.health_report().ready

    def _update_health(self) -> None:
        with self._health_lock:  # housekeeping and health-check RPCs both call this
            self._set_health()

    def _set_health(self) -> None:
        report = self.health_report()
        status = SERVING if report.ready else NOT_SERVING
        for name in ("", CHECK_SERVICE, AUTHZ_SERVICE):
            self.health.set(name, status)
        self.health.set(SYNC_HEALTH, SERVING if self.sync.connected else NOT_SERVING)
        if report.status is not self._last_status:
            level = logging.INFO if report.status is Status.SERVING else logging.WARNING
            fields = {"status": report.status.value, "reasons": list(report.reasons)}
            log.log(level, "health changed", extra=fields)
            self._last_status = report.status

    def _housekeeping(self) -> None:
        ticks = 0
        while not self._stop.wait(TICK):
            ticks += 1
            self._update_health()
            reconnects = self.sync.reconnects
            if reconnects > self._reconnects_seen:
                self.metrics.sync_reconnects.inc(reconnects - self._reconnects_seen)
                self._reconnects_seen = reconnects
            for kind, count in list(self.replica.unknown_kinds.items()):
                seen = self._unknown_seen.get(kind, 0)
                if count > seen:
                    self.metrics.replica_unknown_changes.labels(kind).inc(count - seen)
                    self._unknown_seen[kind] = count
            self.denial_log.flush()
            if ticks % max(1, int(self.settings.policy_poll_interval / TICK)) == 0:
                self.policy_watcher.poll()
            if ticks % 2400 == 0:  # every ten minutes
                self.replica.prune(self.clock.now())

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: health NOT_SERVING; keep answering for ``drain_delay`` so Envoy's
        health checks (or Kubernetes endpoints) move traffic away; stop accepting and let
        in-flight checks finish within ``grace``; stop syncing (persisting the replica); flush
        logs, audit (``closers``) and spans; close the metrics port last."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self._draining = True
        self._update_health()
        log.info("draining", extra={"drain_delay": self.settings.drain_delay, "grace": grace})
        if self.settings.drain_delay and self._server is not None:
            time.sleep(self.settings.drain_delay)
        self._stop.set()
        # grpc cancels what is still running at ``grace``; its shutdown then completes at
        # once unless something in grpc core is stuck: don't let that hold the flushes.
        if self._server is not None and not self._server.stop(grace).wait(grace + 1):
            log.warning("gRPC server did not finish stopping; flushing anyway")
        if self.audit is not None:
            # Every answered check is in the queue now: spool it all, then ship for a while.
            self.audit.close(timeout=grace)
        if self.usage is not None:
            self.usage.close()
        if self._syncing:
            self.sync.stop()
        if self.link is not None:
            self.link.close()
        if self.limit_sync is not None:
            self.limit_sync.stop()
        self.denial_log.close()  # the lines still queued, then the summary
        for close in self.closers:
            try:
                close()
            except Exception:
                log.exception("shutdown step failed")
        if self.tracing is not None:
            self.tracing.shutdown()
        if self.status_server is not None:
            self.status_server.stop()
        log.info("sidecar stopped")


def _control_plane_link(settings: SidecarSettings) -> Link | None:
    """The link process for calls to the control plane, unless ``control_plane_link =
    "inprocess"``."""
    if settings.control_plane_link != "process":
        return None
    files = sync_tls_files(settings)
    tls = None if files is None else TlsFiles(*files)
    return Link(tls, sync_channel_options(settings))


def _audit_pipeline(
    settings: SidecarSettings, sync_token: str, channels: Callable[[str], grpc.Channel] | None
) -> AuditPipeline | None:
    """Decision records: queue → spool in the state directory → the control plane."""
    if settings.audit == "off":
        return None
    config = ShipConfig(
        spool_dir=settings.audit_dir or settings.state_dir / "audit",
        queue_capacity=settings.audit_queue_capacity,
        allow_sample_rate=settings.audit_allow_sample_rate,
        write_interval=settings.audit_write_interval,
        fsync_interval=settings.audit_fsync_interval,
    )
    transport: Transport
    if settings.redis_url:
        from sidecar.bus.audit_stream import RedisStreamTransport  # loads redis only if used

        transport = RedisStreamTransport(settings.redis_url)
    else:
        transport = GrpcTransport(
            settings.control_plane,
            sync_token,
            credentials=sync_channel_credentials(settings),
            options=sync_channel_options(settings),
            channel_factory=channels,
        )
    return AuditPipeline(config, transport)


def _usage_reporter(
    settings: SidecarSettings,
    clock: Clock,
    sync_token: str,
    channels: Callable[[str], grpc.Channel] | None,
) -> UsageReporter | None:
    """Uses per API key and OAuth grant, counted on the RPC threads, reported every interval."""
    if not settings.usage_report_interval:
        return None
    transport = GrpcUsageTransport(
        settings.control_plane,
        sync_token,
        credentials=sync_channel_credentials(settings),
        options=sync_channel_options(settings),
        channel_factory=channels,
    )
    return UsageReporter(
        UsageTally(clock.now),
        transport,
        interval=settings.usage_report_interval,
        clock=time.monotonic,
    )


def _limit_sync(
    settings: SidecarSettings, limiter: WindowRateLimiter, clock: Clock
) -> RedisLimitSync | None:
    """Shared counts through Redis from a background thread (the Check path never waits)."""
    if not settings.redis_url:
        return None
    from sidecar.ratelimit.shared import RedisLimitSync  # loads redis only if used

    return RedisLimitSync(
        limiter, settings.redis_url, clock, interval=settings.ratelimit_sync_interval
    )
