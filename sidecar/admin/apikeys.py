"""ApiKeyService servicer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as pb_grpc
from sidecar.admin import convert
from sidecar.admin.rpc import Authenticator, admin_rpc
from sidecar.authz.decision import Identity
from sidecar.authz.engine import route_decision
from sidecar.authz.policy import METHODS, Policy
from sidecar.core.apikeys import ApiKeyService, KeyEdit
from sidecar.core.clock import Clock
from sidecar.core.errors import InvalidArgument
from sidecar.core.models import ApiKey, RequestContext
from sidecar.core.usage import UsageService

MAX_PATH = 2048


class ApiKeyServicer(pb_grpc.ApiKeyServiceServicer):  # type: ignore[misc]
    """Admin API for API keys."""

    def __init__(
        self,
        service: ApiKeyService,
        clock: Clock,
        policy: Callable[[], Policy] | None = None,
        authenticator: Authenticator | None = None,
        usage: UsageService | None = None,
    ) -> None:
        self.authenticator: Authenticator = authenticator or service
        self._svc = service
        self._clock = clock
        self._policy = policy
        self._usage = usage

    @admin_rpc
    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, ctx: RequestContext
    ) -> pb.CreateApiKeyResponse:
        minted = await asyncio.to_thread(
            self._svc.create,
            ctx,
            workspace=request.workspace,
            name=request.name,
            scopes=list(request.scopes),
            expires_in=_seconds(request.expires_in_seconds, "expires_in"),
            rate_limit=(
                (request.rate_limit.requests, request.rate_limit.period_seconds)
                if request.HasField("rate_limit")
                else None
            ),
            description=request.description,
            client_cidrs=list(request.client_cidrs),
            rotation_period=_seconds(request.rotation_period_seconds, "rotation_period"),
        )
        return pb.CreateApiKeyResponse(
            api_key=convert.api_key(minted.key, self._clock.now()), key=minted.secret
        )

    @admin_rpc
    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, ctx: RequestContext
    ) -> pb.ListApiKeysResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        state = convert.PB_TO_STATE.get(request.state)
        if state is None and request.state != pb.API_KEY_STATE_UNSPECIFIED:
            raise InvalidArgument("state", "unknown state")
        page = await asyncio.to_thread(
            self._svc.list,
            ctx,
            workspace=request.workspace,
            state=state,
            page_size=request.page_size,
            page_token=request.page_token,
            unused_for=_seconds(request.unused_for_seconds, "unused_for"),
            expiring_within=_seconds(request.expiring_within_seconds, "expiring_within"),
            rotation_due=request.rotation_due,
        )
        now = self._clock.now()
        return pb.ListApiKeysResponse(
            api_keys=[convert.api_key(k, now, page.last_used.get(k.id)) for k in page.items],
            next_page_token=page.next_token,
        )

    @admin_rpc
    async def GetApiKey(
        self, request: pb.GetApiKeyRequest, ctx: RequestContext
    ) -> pb.GetApiKeyResponse:
        key = await asyncio.to_thread(self._svc.get, ctx, request.id)
        if self._usage is None:
            return pb.GetApiKeyResponse(api_key=convert.api_key(key, self._clock.now()))
        usage = await asyncio.to_thread(self._usage.of, key.id)
        return pb.GetApiKeyResponse(
            api_key=convert.api_key(key, self._clock.now(), usage.last_used_at),
            daily_uses=convert.daily_uses(usage.daily),
        )

    @admin_rpc
    async def CreateReplacementApiKey(
        self, request: pb.CreateReplacementApiKeyRequest, ctx: RequestContext
    ) -> pb.CreateReplacementApiKeyResponse:
        minted = await asyncio.to_thread(
            self._svc.replace,
            ctx,
            request.id,
            grace=_seconds(request.grace_seconds, "grace"),
            expires_in=_seconds(request.expires_in_seconds, "expires_in"),
        )
        now = self._clock.now()
        assert minted.replaced is not None
        return pb.CreateReplacementApiKeyResponse(
            api_key=convert.api_key(minted.key, now),
            key=minted.secret,
            replaced=convert.api_key(minted.replaced, now),
        )

    @admin_rpc
    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, ctx: RequestContext
    ) -> pb.RevokeApiKeyResponse:
        key = await asyncio.to_thread(
            self._svc.revoke, ctx, request.id, reason=request.reason, force=request.force
        )
        return pb.RevokeApiKeyResponse(api_key=convert.api_key(key, self._clock.now()))

    @admin_rpc
    async def WhoAmI(self, request: pb.WhoAmIRequest, ctx: RequestContext) -> pb.WhoAmIResponse:
        key = await asyncio.to_thread(self._svc.whoami, ctx)
        response = pb.WhoAmIResponse(api_key=convert.api_key(key, self._clock.now()))
        if not request.method and not request.path:
            return response
        method, path = _route_question(request)
        if self._policy is None:
            raise InvalidArgument("path", "this control plane has no route policy to consult")
        decision, match = route_decision(self._policy(), method, path, key_identity(key))
        response.decision.CopyFrom(
            pb.RouteDecision(
                allowed=decision.allowed,
                reason=decision.reason.value,
                http_status=decision.http_status,
                route=match.route.name if match is not None else "",
                required_scopes=list(match.route.scopes) if match is not None else [],
            )
        )
        return response

    @admin_rpc
    async def UpdateApiKey(
        self, request: pb.UpdateApiKeyRequest, ctx: RequestContext
    ) -> pb.UpdateApiKeyResponse:
        key = await asyncio.to_thread(self._svc.update, ctx, request.id, _edit(request))
        return pb.UpdateApiKeyResponse(api_key=convert.api_key(key, self._clock.now()))

    @admin_rpc
    async def SuspendApiKey(
        self, request: pb.SuspendApiKeyRequest, ctx: RequestContext
    ) -> pb.SuspendApiKeyResponse:
        key = await asyncio.to_thread(self._svc.suspend, ctx, request.id, reason=request.reason)
        return pb.SuspendApiKeyResponse(api_key=convert.api_key(key, self._clock.now()))

    @admin_rpc
    async def ResumeApiKey(
        self, request: pb.ResumeApiKeyRequest, ctx: RequestContext
    ) -> pb.ResumeApiKeyResponse:
        key = await asyncio.to_thread(self._svc.resume, ctx, request.id)
        return pb.ResumeApiKeyResponse(api_key=convert.api_key(key, self._clock.now()))

    @admin_rpc
    async def RecordApiKeyRotationStep(
        self, request: pb.RecordApiKeyRotationStepRequest, ctx: RequestContext
    ) -> pb.RecordApiKeyRotationStepResponse:
        await asyncio.to_thread(
            self._svc.record_rotation_step,
            ctx,
            request.id,
            request.step,
            target=request.target,
            detail=request.detail,
        )
        return pb.RecordApiKeyRotationStepResponse()


def key_identity(key: ApiKey) -> Identity:
    """The identity a sidecar's replica holds for ``key`` (what its checks decide with)."""
    return Identity(
        kind="api_key",
        id=key.id,
        workspace=key.workspace,
        scopes=frozenset(key.scopes),
        expires_at=key.expires_at,
        rate_limit=key.rate_limit,
        rate_period=key.rate_period,
    )


def _route_question(request: pb.WhoAmIRequest) -> tuple[str, str]:
    """The (method, path) of a whoami question, validated."""
    method = request.method.upper()
    if method not in METHODS:
        raise InvalidArgument("method", f"must be one of {', '.join(sorted(METHODS))}")
    path = request.path
    if not path.startswith("/") or len(path) > MAX_PATH:
        raise InvalidArgument("path", f"must start with / and be at most {MAX_PATH} characters")
    return method, path


def _edit(request: pb.UpdateApiKeyRequest) -> KeyEdit:
    if request.clear_rate_limit and request.HasField("rate_limit"):
        raise InvalidArgument("rate_limit", "set a rate limit or clear it, not both")
    rate: tuple[int, int] | None = None
    if request.clear_rate_limit:
        rate = (0, 0)
    elif request.HasField("rate_limit"):
        rate = (request.rate_limit.requests, request.rate_limit.period_seconds)
    return KeyEdit(
        name=request.name if request.HasField("name") else None,
        description=request.description if request.HasField("description") else None,
        rate_limit=rate,
        client_cidrs=list(request.client_cidrs.cidrs) if request.HasField("client_cidrs") else None,
        rotation_period=(
            _seconds(request.rotation_period_seconds, "rotation_period")
            if request.HasField("rotation_period_seconds")
            else None
        ),
    )


def _seconds(value: int, field: str) -> int:
    if value < 0:
        raise InvalidArgument(field, "must not be negative")
    return value
