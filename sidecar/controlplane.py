"""The control plane process: the store, the admin gRPC API, the HTTP port (``/metrics``,
``/healthz``, ``/readyz``), and periodic housekeeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar._gen.statuspulse.auth.v1 import (
    api_keys_pb2,
    api_keys_pb2_grpc,
    audit_pb2,
    oauth_pb2,
    oauth_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from sidecar.admin import http_rules
from sidecar.admin.apikeys import ApiKeyServicer
from sidecar.admin.apps import OAuthAppServicer
from sidecar.admin.audit import AuditServicer
from sidecar.admin.audit import add_to_server as add_audit_service
from sidecar.admin.http_api import AdminHttpApi
from sidecar.admin.openapi_route import openapi_routes
from sidecar.admin.signing_keys import SigningKeyServicer
from sidecar.admin.throttle import FailureThrottle
from sidecar.admin.usage import UsageServicer
from sidecar.admin.users import UserServicer
from sidecar.admin.webhooks import WebhookServicer
from sidecar.authz.policy import Policy
from sidecar.authz.policy_source import PolicyWatcher, load_policy
from sidecar.config import Settings, trusted_networks
from sidecar.core import kek
from sidecar.core.apikeys import ApiKeyService, KeyPolicy, key_rows
from sidecar.core.apps import AppService
from sidecar.core.audit_trail import AuditPolicy, AuditTrail
from sidecar.core.changes import oauth_snapshot
from sidecar.core.clock import Clock, SystemClock
from sidecar.core.errors import SpauthError, Unavailable
from sidecar.core.kek import KeyEncryption
from sidecar.core.models import Minted
from sidecar.core.usage import UsageService
from sidecar.core.users import UserService
from sidecar.core.webhooks import WebhookService
from sidecar.http.app import build_app
from sidecar.http.console import ConsoleServices, SessionPolicy, console_routes
from sidecar.http.routes import oauth_routes
from sidecar.oauth.config import OAuthConfig
from sidecar.oauth.key_admin import SigningKeyAdmin
from sidecar.oauth.server import AuthorizationServer
from sidecar.oauth.signing import SigningKeys
from sidecar.ops.admin_calls import AdminCallInterceptor
from sidecar.ops.health import Health, Status, worst
from sidecar.ops.http_guard import HttpLimits
from sidecar.ops.http_routes import ops_routes
from sidecar.ops.http_server import HttpServer
from sidecar.ops.key_metrics import KeyExpiryMetrics
from sidecar.ops.metrics import OAUTH_EVENTS, Metrics
from sidecar.ops.secrets_files import audit_signing_key, control_plane_sync_token
from sidecar.ops.tls import admin_server_credentials, http_ssl_files
from sidecar.ops.tracing import start_tracing
from sidecar.ratelimit.local import AbuseLimits, WindowRateLimiter
from sidecar.replication.packing import packed_keys
from sidecar.replication.server import ReplicationServicer, SnapshotSource
from sidecar.replication.snapshot_file import FILE_NAME as SNAPSHOT_FILE_NAME
from sidecar.store import Store, open_store
from sidecar.webhooks.delivery import Deliverer
from sidecar.webhooks.sealing import WebhookSealer, legacy_keys

if TYPE_CHECKING:
    from sidecar.bus import AuditStreamConsumer
    from sidecar.replication.bus import RedisChangeBus

log = logging.getLogger("sidecar.controlplane")
AUDIT_PRUNE_INTERVAL = 3600.0  # retention is in days; checking hourly is plenty
OPERATOR_CHECK_INTERVAL = 3600.0


def _failure_limiter(limit: int, window: float) -> WindowRateLimiter | None:
    """The sidecar's limiter, counting refused admin keys per source address (None: off)."""
    if limit <= 0:
        return None
    return WindowRateLimiter(
        AbuseLimits(source_failures=limit, key_failures=0, failure_window=window)
    )


class ControlPlane:
    """Admin API over a store. ``start()`` binds; ``aclose()`` drains and releases."""

    def __init__(
        self, settings: Settings, clock: Clock | None = None, *, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self.metrics.control_plane_metrics()
        self.tracing = start_tracing(
            settings.tracing_endpoint, "spauth-control-plane", settings.tracing_sample_ratio
        )
        self.store: Store = open_store(settings.store_url)
        self.keys = ApiKeyService(
            self.store,
            self.clock,
            KeyPolicy(
                default_lifetime=settings.key_default_lifetime,
                max_lifetime=settings.key_max_lifetime,
                expiry_warning=settings.key_expiry_warning,
            ),
        )
        self.usage = UsageService(self.store, self.clock)
        # One set of key-encryption keys seals every secret the control plane must use: the
        # signing keys' private parts and the webhooks' signing secrets.
        encryption = key_encryption(settings)
        sealer = WebhookSealer(encryption, legacy_keys(settings.webhook_key, settings.data_dir))
        self.webhooks = WebhookService(self.store, self.clock, sealer)
        self.deliverer = Deliverer(
            self.store,
            self.clock,
            sealer,
            allow_private=settings.webhook_destinations == "any",
        )
        self.key_expiry = KeyExpiryMetrics(self.keys.policy.expiry_warning)
        self.metrics.registry.register(self.key_expiry)
        # Never anonymous: without a configured token one is generated into the data dir.
        self.sync_token = control_plane_sync_token(settings)
        self.audit = AuditTrail(
            self.store,
            self.clock,
            audit_signing_key(settings),
            AuditPolicy(max_future_skew=settings.audit_max_future_skew),
            on_conflict=self.metrics.audit_ingest_conflicts.inc,
            on_ingested=lambda r: self.metrics.count_ingest(
                r.stored, (refusal.reason.value for refusal in r.refused)
            ),
        )
        # Every admin call (gRPC or HTTP) authenticates through this: refused keys are counted
        # per source address.
        self.guard = FailureThrottle(
            self.keys,
            self.clock,
            _failure_limiter(settings.admin_failure_limit, settings.admin_failure_window),
            settings.admin_failure_window,
        )
        self.audit_servicer = AuditServicer(self.audit, self.guard, sync_token=self.sync_token)
        self._unsubscribe = self.store.subscribe(self.audit_servicer.notify)
        self.snapshot_sources: list[SnapshotSource] = [oauth_snapshot]
        self.replication = ReplicationServicer(
            self.store,
            self.clock,
            self.snapshot_sources,
            key_source=key_rows,
            packed_key_source=packed_keys,
            heartbeat=settings.sync_heartbeat,
            sync_token=self.sync_token,
            snapshot_file=settings.data_dir / SNAPSHOT_FILE_NAME,
        )
        # The sidecars' route policy, for whoami's "what would the policy decide" (reloaded when
        # the file changes, as the sidecar does).
        self.policy = load_policy(settings.policy_file)
        self.policy_watcher = PolicyWatcher(settings.policy_file, self._set_policy)
        self.apps = AppService(self.store, self.clock)
        self.users = UserService(self.store, self.clock)
        # The signing keys need no port (the issuer does): the admin API rotates them too.
        self.signing_keys = SigningKeys(
            self.store,
            self.clock,
            rotation_interval=settings.oauth_signing_key_rotation,
            access_token_ttl=settings.oauth_access_token_ttl,
            encryption=encryption,
            lead_time=settings.oauth_signing_key_lead_time,
        )
        self.oauth: AuthorizationServer | None = None  # built in start(), once the port is bound
        self.health = health_aio.HealthServicer()
        # Other components' health, folded into /readyz (spauth serve adds the sidecar's).
        self.health_checks: list[Callable[[], Health]] = []
        # Run at the end of aclose(), after in-flight calls drained (e.g. flush the audit queue).
        self.closers: list[Callable[[], None]] = []
        # /metrics, /healthz, /readyz: served on http_addr next to the OAuth routes.
        self.http_routes = ops_routes(self.metrics.registry, self.readiness)
        self.http = HttpServer(
            settings.http_addr,
            ssl_files=http_ssl_files(settings),
            limits=HttpLimits(
                read_timeout=settings.http_read_timeout,
                body_timeout=settings.http_body_timeout,
                max_connections=settings.http_max_connections,
            ),
        )
        self._server: grpc.aio.Server | None = None
        self.servicers: dict[str, object] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._deliveries: asyncio.Task[None] | None = None
        self.bus: RedisChangeBus | None = None
        self.audit_stream: AuditStreamConsumer | None = None
        self._draining = False
        self._closed = False
        self.admin_port = 0
        self.http_port = 0

    def bootstrap(self) -> Minted | None:
        """Create the operator key on first start (None when one exists already)."""
        return self.keys.bootstrap_operator_key()

    async def readiness(self) -> Health:
        """``/readyz``: not serving before start, while draining, or when the store does not
        answer; combined with the health of embedded components."""
        if self._draining:
            return Health(Status.NOT_SERVING, ("draining",))
        if self._server is None or not self.replication.ready:
            return Health(Status.NOT_SERVING, ("starting",))
        try:
            await asyncio.wait_for(asyncio.to_thread(self._ping_store), 2.0)
        except Exception as exc:
            log.warning("store ping failed", extra={"error": repr(exc)})
            return Health(Status.NOT_SERVING, ("store_unavailable",))
        return worst([Health(Status.SERVING), *(check() for check in self.health_checks)])

    def _ping_store(self) -> None:
        with self.store.read() as uow:
            uow.changes.head()

    async def start(self) -> None:
        interceptor = AdminCallInterceptor(self.metrics.admin_calls, self.tracing)
        server = grpc.aio.server(interceptors=[interceptor])
        self.servicers = {
            "statuspulse.auth.v1.ApiKeyService": ApiKeyServicer(
                self.keys, self.clock, lambda: self.policy, self.guard, usage=self.usage
            ),
            "statuspulse.auth.v1.OAuthAppService": OAuthAppServicer(self.apps, self.guard),
            "statuspulse.auth.v1.UserService": UserServicer(self.users, self.guard),
            "statuspulse.auth.v1.AuditService": self.audit_servicer,
            "statuspulse.auth.v1.WebhookService": WebhookServicer(self.webhooks, self.guard),
            "statuspulse.auth.v1.SigningKeyService": SigningKeyServicer(
                SigningKeyAdmin(self.signing_keys, self.clock), self.guard, self.clock
            ),
        }
        api_keys_pb2_grpc.add_ApiKeyServiceServicer_to_server(
            self.servicers["statuspulse.auth.v1.ApiKeyService"], server
        )
        webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(
            self.servicers["statuspulse.auth.v1.WebhookService"], server
        )
        # Sidecars only (the sync token), never over the HTTP API.
        usage_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageServicer(self.usage, self.guard, sync_token=self.sync_token), server
        )
        oauth_pb2_grpc.add_OAuthAppServiceServicer_to_server(
            self.servicers["statuspulse.auth.v1.OAuthAppService"], server
        )
        oauth_pb2_grpc.add_UserServiceServicer_to_server(
            self.servicers["statuspulse.auth.v1.UserService"], server
        )
        oauth_pb2_grpc.add_SigningKeyServiceServicer_to_server(
            self.servicers["statuspulse.auth.v1.SigningKeyService"], server
        )
        replication_pb2_grpc.add_ReplicationServiceServicer_to_server(self.replication, server)
        add_audit_service(self.audit_servicer, server)  # IngestAuditRecords as raw bytes
        self.audit_servicer.bind(asyncio.get_running_loop())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            api_keys_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name,
            replication_pb2.DESCRIPTOR.services_by_name["ReplicationService"].full_name,
            oauth_pb2.DESCRIPTOR.services_by_name["OAuthAppService"].full_name,
            oauth_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
            audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
            usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
            webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
            oauth_pb2.DESCRIPTOR.services_by_name["SigningKeyService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        credentials = admin_server_credentials(self.settings)
        addr = self.settings.admin_addr
        if credentials is None:
            self.admin_port = server.add_insecure_port(addr)
        else:
            self.admin_port = server.add_secure_port(addr, credentials)
        if self.admin_port == 0:
            raise OSError(f"admin_addr: cannot listen on {addr}")
        await self._start_http()
        self.http_port = self.http.port
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # until ready
        try:
            await server.start()
        except BaseException:
            await self.http.aclose()
            raise
        self._server = server
        # Ready only with the sidecars' packed snapshot at hand (read from its file or built),
        # before the start-up sweeps below compete for the same cores.
        await asyncio.to_thread(self._prepare_snapshot)
        for name in ("", *names[:4]):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await asyncio.to_thread(self.check_operator_keys)
        await asyncio.to_thread(self._rewrap_webhook_secrets)
        self._sweeper = asyncio.create_task(self._sweep_forever())
        self._deliveries = asyncio.create_task(self._deliver_forever())
        await self._start_redis()
        log.info(
            "control plane listening",
            extra={
                "admin_addr": addr,
                "admin_tls": credentials is not None,
                "http_addr": self.settings.http_addr,
            },
        )

    def _prepare_snapshot(self) -> None:
        try:
            self.replication.prepare()
        except SpauthError as exc:  # the store is down: the first Subscribe builds it
            log.warning("packed snapshot not prepared", extra={"error": exc.message})
            self.replication.ready = True

    def _rewrap_webhook_secrets(self) -> None:
        """Webhook secrets under an older KEK, or the pre-KEK webhook key, are re-sealed under
        the newest KEK (the signing keys get the same when the OAuth server starts)."""
        changed, unopened = self.webhooks.rewrap()
        if changed:
            log.info("webhook secrets re-sealed under the newest key-encryption key",
                     extra={"count": changed})  # fmt: skip
        if unopened:
            log.error(
                "webhook secrets that no configured key opens: their deliveries fail until "
                "the key they were sealed with is configured again (key_encryption_key, "
                "webhook_key)",
                extra={"count": unopened},
            )

    async def _start_http(self) -> None:
        """The OAuth authorization server on ``http_addr`` (its issuer names the bound port)."""
        port = self.http.bind()
        self.oauth = AuthorizationServer(
            self.store,
            self.clock,
            oauth_config(self.settings, port),
            token_events=self._oauth_token_event,
            keys=self.signing_keys,
        )
        await asyncio.to_thread(self.oauth.start)
        console = console_routes(
            ConsoleServices(
                keys=self.keys,
                usage=self.usage,
                apps=self.apps,
                users=self.users,
                audit=self.audit,
                oauth=self.oauth,
                store=self.store,
                clock=self.clock,
            ),
            # Secure cookies when browsers reach this port over HTTPS: served with TLS here,
            # or behind a TLS-terminating proxy whose public URL is the https:// issuer.
            secure_cookies=self.oauth.config.secure_cookies or self.http.ssl_files is not None,
            policy=SessionPolicy(
                idle=self.settings.console_idle_timeout,
                absolute=self.settings.console_session_lifetime,
            ),
        )
        admin = AdminHttpApi(http_rules.bindings(), self.servicers, self.metrics.admin_calls)
        await self.http.start(
            build_app(
                oauth_routes(self.oauth, self.keys),
                admin.routes(),
                openapi_routes(),
                console,
                self.http_routes,
                exception_handlers={404: admin.unrouted},
            )
        )
        log.info("oauth listening", extra={"http_addr": self.settings.http_addr, "port": port})

    async def _start_redis(self) -> None:
        """Scale-out: the change bus between replicas and the consumer of the sidecars' audit
        stream. Neither fails to start, nor stops the control plane, because Redis is down."""
        url = self.settings.redis_url
        if not url:
            return
        # Imported only when used: redis-py loads OpenTelemetry on import.
        from sidecar.bus import AuditStreamConsumer, DeadLetterStream
        from sidecar.replication.bus import RedisChangeBus

        self.bus = RedisChangeBus(url, self.store, self._committed_elsewhere)
        await self.bus.start()
        dead = self.metrics.audit_stream_dead_lettered
        self.audit_stream = AuditStreamConsumer(
            url,
            self.audit,
            dead_letters=DeadLetterStream(on_dead_letter=lambda r: dead.labels(r).inc()),
        )
        await self.audit_stream.start()

    def _set_policy(self, policy: Policy) -> None:
        self.policy = policy

    def _committed_elsewhere(self, revision: int) -> None:
        """Another replica committed ``revision``: streams and audit tails look now."""
        self.replication.wake(revision)
        self.audit_servicer.notify(revision)

    def _oauth_token_event(self, event: str) -> None:
        # Only the known events become label values (bounded, whatever a caller passes).
        if event in OAUTH_EVENTS:
            self.metrics.oauth_tokens.labels(event).inc()

    def check_operator_keys(self) -> int:
        """Export when the last usable operator key expires, and warn in the log when that is
        within ``operator_key_warning`` (or already past); returns the expiry (0: none)."""
        expiry = self.keys.operator_expiry()
        self.metrics.operator_key_expiry.set(expiry)
        left = expiry - self.clock.now()
        if left <= self.settings.operator_key_warning:
            log.warning(
                "operator key expiring: create a second operator key (or `spauth operator "
                "mint` with local access to the store) before the last one expires",
                extra={"expires_at": expiry, "seconds_left": max(0, int(left))},
            )
        return expiry

    async def _sweep_forever(self) -> None:
        next_prune = next_sign = 0.0
        next_operator_check = self.clock.now() + OPERATOR_CHECK_INTERVAL
        while True:
            if self.clock.now() >= next_operator_check:
                next_operator_check = self.clock.now() + OPERATOR_CHECK_INTERVAL
                with contextlib.suppress(SpauthError):
                    await asyncio.to_thread(self.check_operator_keys)
            try:
                await asyncio.to_thread(self.policy_watcher.poll)
                changed = await asyncio.to_thread(self.keys.sweep)
                await asyncio.to_thread(self.replication.refresh)  # the sidecars' snapshot
                self.key_expiry.update(await asyncio.to_thread(self.keys.expiring_counts))
                if self.oauth is not None:
                    changed += await asyncio.to_thread(self.oauth.sweep)
                if changed:
                    log.info("swept keys", extra={"changed": changed})
            except SpauthError as exc:  # the store down, say: expected, said without a traceback
                log.warning("sweep failed; retrying", extra={"error": exc.message})
            except Exception:
                log.exception("sweep failed; retrying")
            if self.clock.now() >= next_prune:
                next_prune = self.clock.now() + AUDIT_PRUNE_INTERVAL
                if self.settings.audit_retention:
                    await self._prune_audit()
                await self._prune_usage()
            if self.clock.now() >= next_sign:
                next_sign = self.clock.now() + self.settings.audit_sign_interval
                await self._sign_audit_heads()
            await asyncio.sleep(self.settings.sweep_interval)

    async def _sign_audit_heads(self) -> None:
        """A periodic signed checkpoint of every chain's head (docs/security.md)."""
        try:
            await asyncio.to_thread(self.audit.sign_heads)
        except SpauthError as exc:
            log.warning("signing audit heads failed; retrying", extra={"error": exc.message})

    async def _deliver_forever(self) -> None:
        """The webhook outbox: due deliveries sent every webhook_poll_interval seconds."""
        while True:
            try:
                await asyncio.to_thread(self.deliverer.run_once)
            except Unavailable as exc:  # the store down: expected, retried, no traceback
                log.warning("webhook delivery pass failed; retrying", extra={"error": exc.message})
            except Exception:
                log.exception("webhook delivery pass failed; retrying")
            await asyncio.sleep(self.settings.webhook_poll_interval)

    async def _prune_usage(self) -> None:
        try:
            await asyncio.to_thread(self.usage.prune)
        except Unavailable as exc:  # the store down: expected, retried, no traceback
            log.warning("usage retention failed; retrying", extra={"error": exc.message})
        except SpauthError as exc:
            log.error("usage retention failed", extra={"error": exc.message})
        except Exception:  # never the end of the sweeper, whose loop calls this
            log.exception("usage retention failed; retrying")

    async def _prune_audit(self) -> None:
        before = self.clock.now() - self.settings.audit_retention
        try:
            pruned = await asyncio.to_thread(self.audit.prune, before)
            if pruned:
                log.info("pruned audit records", extra={"pruned": pruned})
        except Unavailable as exc:  # the store down: expected, retried, no traceback
            log.warning("audit retention failed; retrying", extra={"error": exc.message})
        except SpauthError as exc:
            log.error("audit retention refused", extra={"error": exc.message})
        except Exception:  # never the end of the sweeper, whose loop calls this
            log.exception("audit retention failed; retrying")

    async def aclose(self, grace: float | None = None) -> None:
        """Health NOT_SERVING (gRPC and /readyz); keep serving for ``drain_delay``; stop
        accepting and drain in-flight calls within ``grace`` (open sync streams are cancelled
        then, and sidecars reconnect elsewhere); flush; close the HTTP port and the store."""
        if self._closed:
            return
        self._closed = True
        grace = self.settings.shutdown_grace if grace is None else grace
        self._draining = True
        await self.health.enter_graceful_shutdown()
        if self.settings.drain_delay and self._server is not None:
            await asyncio.sleep(self.settings.drain_delay)
        for task in (self._sweeper, self._deliveries):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._unsubscribe()
        self.audit_servicer.close()  # tails end now and resume by cursor elsewhere
        if self._server is not None:
            await self._server.stop(grace)
        if self.bus is not None:
            await self.bus.aclose()
        if self.audit_stream is not None:
            await self.audit_stream.aclose()
        for close in self.closers:
            try:
                await asyncio.to_thread(close)
            except Exception:
                log.exception("shutdown step failed")
        if self._sweeper is not None:  # started: sign what the last calls and closers wrote
            await self._sign_audit_heads()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
        await self.http.aclose(grace)
        self.store.close()


def oauth_config(settings: Settings, http_port: int) -> OAuthConfig:
    """The OAuth configuration of a control plane whose HTTP server is bound to ``http_port``
    (the default issuer names the bound port, so ``--http-addr 127.0.0.1:0`` works)."""
    issuer = settings.oauth_issuer
    if not issuer:
        host = settings.http_addr.rpartition(":")[0]
        issuer = f"http://{host}:{http_port}"
        if host in ("0.0.0.0", "::", "[::]"):  # noqa: S104 (comparing, not binding)
            logging.getLogger("sidecar.oauth").warning(
                "oauth_issuer is not set and http_addr is a wildcard address: tokens will name "
                "an issuer clients cannot reach; set oauth_issuer to the public URL",
                extra={"issuer": issuer},
            )
    return OAuthConfig(
        issuer=issuer,
        audience=settings.oauth_audience,
        access_token_ttl=settings.oauth_access_token_ttl,
        refresh_token_ttl=settings.oauth_refresh_token_ttl,
        signing_key_rotation=settings.oauth_signing_key_rotation,
        signing_key_lead_time=settings.oauth_signing_key_lead_time,
        grant_lifetime=settings.oauth_grant_lifetime,
        trusted_proxies=trusted_networks(settings.trusted_proxies),
    )


def key_encryption(settings: Settings) -> KeyEncryption:
    """The KEKs from ``key_encryption_key`` (env SPAUTH_KEY_ENCRYPTION_KEY), from
    ``key_encryption_key_file``, or generated into the data directory on first start (the
    settings' checks refuse the last with a shared store: every replica needs the same KEK)."""
    if settings.key_encryption_key:
        return KeyEncryption(kek.parse(settings.key_encryption_key, "key_encryption_key"))
    if settings.key_encryption_key_file is not None:
        path = settings.key_encryption_key_file
        try:
            return KeyEncryption(kek.parse(path.read_text(), f"key_encryption_key_file {path}"))
        except OSError as exc:
            raise kek.KekError(f"key_encryption_key_file: cannot read {path}: {exc}") from None
    return KeyEncryption(kek.load_or_create(settings.data_dir / kek.KEK_FILE))
