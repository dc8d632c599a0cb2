"""The sidecar process: a grpcio sync server (a thread pool measured faster than grpc.aio for this
workload, see docs/performance.md) serving Envoy's Check, the in-cluster AuthorizationService,
health and reflection; a replication thread; and a housekeeping thread (health, policy reload,
pruning)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar._gen.statuspulse.auth.v1 import authorization_pb2, authorization_pb2_grpc
from sidecar.auditship import AuditPipeline, GrpcTransport, ShipConfig, Transport
from sidecar.auditship.observer import DecisionRecorder
from sidecar.bus.audit_stream import RedisStreamTransport
from sidecar.config import SidecarSettings
from sidecar.core.clock import Clock, SystemClock
from sidecar.core.engine import Engine, TokenVerifier
from sidecar.core.policy import Policy
from sidecar.core.replica import Replica
from sidecar.core.token_verifier import ReplicaTokenVerifier
from sidecar.dataplane.envoy_check import SERVICE as CHECK_SERVICE
from sidecar.dataplane.envoy_check import CheckHandler, Observer
from sidecar.dataplane.incluster import AuthorizationServicer
from sidecar.dataplane.policy_source import PolicyWatcher, load_policy
from sidecar.dataplane.sync import SyncClient
from sidecar.ratelimit import AbuseLimits, RedisLimitSync, WindowRateLimiter

log = logging.getLogger("sidecar.server")

AUTHZ_SERVICE = authorization_pb2.DESCRIPTOR.services_by_name["AuthorizationService"].full_name
# SERVING while connected to the control plane; NOT_SERVING = degraded (serving from a replica
# that is no longer updated, until max_staleness).
SYNC_HEALTH = "statuspulse.auth.v1.ReplicaSync"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Sidecar:
    """One sidecar process. ``start()`` binds and begins syncing; ``stop()`` drains."""

    def __init__(
        self,
        settings: SidecarSettings,
        clock: Clock | None = None,
        *,
        token_verifier: TokenVerifier | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.replica = Replica()
        self.limiter = WindowRateLimiter(
            AbuseLimits(
                source_failures=settings.failure_limit_source,
                key_failures=settings.failure_limit_key,
                failure_window=settings.failure_window,
            )
        )
        # Shared counts through Redis from a background thread; the Check path never waits.
        self.limit_sync = (
            RedisLimitSync(
                self.limiter,
                settings.redis_url,
                self.clock,
                interval=settings.ratelimit_sync_interval,
            )
            if settings.redis_url
            else None
        )
        self.engine = Engine(
            self.replica,
            policy or load_policy(settings.policy_file),
            self.clock,
            max_staleness=settings.max_staleness,
            token_verifier=token_verifier
            or ReplicaTokenVerifier(settings.oauth_issuer, settings.oauth_audience),
            limiter=self.limiter,
        )
        self.observers: list[Observer] = []
        self.audit = _audit_pipeline(settings)
        if self.audit is not None:
            self.observers.append(DecisionRecorder(self.audit, self.clock))
        self.check = CheckHandler(self.engine, self.observers)
        self.sync = SyncClient(
            self.replica,
            settings.control_plane,
            self.clock,
            state_dir=settings.state_dir,
            sync_token=settings.sync_token,
        )
        self.policy_watcher = PolicyWatcher(settings.policy_file, self._set_policy)
        self.health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._stop = threading.Event()
        self._housekeeper = threading.Thread(
            target=self._housekeeping, name="spauth-housekeeping", daemon=True
        )
        self.port = 0
        self._draining = False

    def _set_policy(self, policy: Policy) -> None:
        self.engine.policy = policy

    def start(self) -> None:
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.settings.threads, thread_name_prefix="spauth-rpc"),
            options=[("grpc.so_reuseport", 1)],
        )
        server.add_generic_rpc_handlers((self.check.rpc_handler(),))
        authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(
            AuthorizationServicer(self.engine, self.observers), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (CHECK_SERVICE, AUTHZ_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(self.settings.listen)
        if self.port == 0:
            raise OSError(f"listen: cannot listen on {self.settings.listen}")
        self._update_health()
        self.sync.start()
        if self.limit_sync is not None:
            self.limit_sync.start()
        if self.audit is not None:
            self.audit.start()
        server.start()
        self._server = server
        self._update_health()
        self._housekeeper.start()
        log.info(
            "sidecar listening",
            extra={"listen": self.settings.listen, "control_plane": self.settings.control_plane},
        )

    def ready(self) -> bool:
        """Whether checks are decided from a usable replica (else they fail closed)."""
        return self.engine.unready(self.clock.now()) is None and not self._draining

    def _update_health(self) -> None:
        status = SERVING if self.ready() else NOT_SERVING
        for name in ("", CHECK_SERVICE, AUTHZ_SERVICE):
            self.health.set(name, status)
        self.health.set(SYNC_HEALTH, SERVING if self.sync.connected else NOT_SERVING)

    def _housekeeping(self) -> None:
        ticks = 0
        while not self._stop.wait(0.25):
            ticks += 1
            self._update_health()
            if ticks % max(1, int(self.settings.policy_poll_interval / 0.25)) == 0:
                self.policy_watcher.poll()
            if ticks % 2400 == 0:  # every ten minutes
                self.replica.prune(self.clock.now())

    def stop(self, grace: float = 5.0) -> None:
        """Health NOT_SERVING, stop accepting, drain in-flight calls, stop syncing."""
        self._draining = True
        self._update_health()
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace).wait()
        if self.audit is not None:
            # Every answered check is in the queue now: spool it all, then ship for a while.
            self.audit.close(timeout=grace)
        self.sync.stop()
        if self.limit_sync is not None:
            self.limit_sync.stop()


def _audit_pipeline(settings: SidecarSettings) -> AuditPipeline | None:
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
    transport: Transport = (
        RedisStreamTransport(settings.redis_url)
        if settings.redis_url
        else GrpcTransport(settings.control_plane, settings.sync_token)
    )
    return AuditPipeline(config, transport)
