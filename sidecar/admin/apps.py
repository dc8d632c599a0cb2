"""OAuthAppService servicer: third-party apps and their sessions (grants)."""

from __future__ import annotations

import asyncio

from sidecar._gen.statuspulse.auth.v1 import oauth_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import oauth_pb2_grpc as pb_grpc
from sidecar.admin.convert import timestamp
from sidecar.admin.paging import page
from sidecar.admin.rpc import Authenticator, admin_rpc
from sidecar.core.apps import AppService
from sidecar.core.errors import InvalidArgument
from sidecar.core.models import RequestContext
from sidecar.core.oauth_models import AppSession, OAuthApp
from sidecar.core.scopes import sort_scopes


def app_pb(app: OAuthApp) -> pb.OAuthApp:
    """An app as the API shows it (never a secret digest)."""
    return pb.OAuthApp(
        client_id=app.id,
        name=app.name,
        workspace=app.workspace,
        redirect_uris=list(app.redirect_uris),
        scopes=sort_scopes(app.scopes),
        confidential=app.confidential,
        create_time=timestamp(app.created_at),
        created_by=app.created_by,
        secret_last_four=app.secret_last_four,
        previous_secret_expire_time=timestamp(app.previous_secret_expires_at),
        delete_time=timestamp(app.deleted_at),
    )


def session_pb(session: AppSession) -> pb.OAuthAppSession:
    grant = session.grant
    return pb.OAuthAppSession(
        grant_id=grant.id,
        client_id=grant.app_id,
        workspace=grant.workspace,
        user_id=grant.user_id,
        email=session.email,
        scopes=sort_scopes(grant.scopes),
        create_time=timestamp(grant.created_at),
        last_use_time=timestamp(grant.last_used_at),
        revoke_time=timestamp(grant.revoked_at),
        revoke_reason=grant.revoke_reason,
    )


def _created(app: OAuthApp) -> tuple[float, str]:
    return float(app.created_at), app.id


class OAuthAppServicer(pb_grpc.OAuthAppServiceServicer):  # type: ignore[misc]
    """Admin API for OAuth apps."""

    def __init__(self, service: AppService, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        self._svc = service

    @admin_rpc
    async def RegisterOAuthApp(
        self, request: pb.RegisterOAuthAppRequest, ctx: RequestContext
    ) -> pb.RegisterOAuthAppResponse:
        registered = await asyncio.to_thread(
            self._svc.register,
            ctx,
            workspace=request.workspace,
            name=request.name,
            redirect_uris=list(request.redirect_uris),
            scopes=list(request.scopes),
            confidential=request.confidential,
        )
        return pb.RegisterOAuthAppResponse(
            app=app_pb(registered.app), client_secret=registered.client_secret
        )

    @admin_rpc
    async def ListOAuthApps(
        self, request: pb.ListOAuthAppsRequest, ctx: RequestContext
    ) -> pb.ListOAuthAppsResponse:
        apps = await asyncio.to_thread(self._svc.list, ctx, workspace=request.workspace)
        chunk, token = page(apps, _created, request.page_size, request.page_token)
        return pb.ListOAuthAppsResponse(apps=[app_pb(a) for a in chunk], next_page_token=token)

    @admin_rpc
    async def GetOAuthApp(
        self, request: pb.GetOAuthAppRequest, ctx: RequestContext
    ) -> pb.GetOAuthAppResponse:
        app = await asyncio.to_thread(self._svc.get, ctx, request.client_id)
        return pb.GetOAuthAppResponse(app=app_pb(app))

    @admin_rpc
    async def RotateOAuthAppSecret(
        self, request: pb.RotateOAuthAppSecretRequest, ctx: RequestContext
    ) -> pb.RotateOAuthAppSecretResponse:
        if request.overlap_seconds < 0:
            raise InvalidArgument("overlap", "must not be negative")
        rotated = await asyncio.to_thread(
            self._svc.rotate_secret, ctx, request.client_id, overlap=request.overlap_seconds
        )
        return pb.RotateOAuthAppSecretResponse(
            app=app_pb(rotated.app), client_secret=rotated.client_secret
        )

    @admin_rpc
    async def DeleteOAuthApp(
        self, request: pb.DeleteOAuthAppRequest, ctx: RequestContext
    ) -> pb.DeleteOAuthAppResponse:
        app = await asyncio.to_thread(self._svc.delete, ctx, request.client_id)
        return pb.DeleteOAuthAppResponse(app=app_pb(app))

    @admin_rpc
    async def ListOAuthAppSessions(
        self, request: pb.ListOAuthAppSessionsRequest, ctx: RequestContext
    ) -> pb.ListOAuthAppSessionsResponse:
        sessions = await asyncio.to_thread(self._svc.sessions, ctx, request.client_id)
        chunk, token = page(
            sessions,
            lambda s: (float(s.grant.created_at), s.grant.id),
            request.page_size,
            request.page_token,
        )
        return pb.ListOAuthAppSessionsResponse(
            sessions=[session_pb(s) for s in chunk], next_page_token=token
        )

    @admin_rpc
    async def RevokeOAuthAppSession(
        self, request: pb.RevokeOAuthAppSessionRequest, ctx: RequestContext
    ) -> pb.RevokeOAuthAppSessionResponse:
        grant = await asyncio.to_thread(self._svc.revoke_session, ctx, request.grant_id)
        return pb.RevokeOAuthAppSessionResponse(session=session_pb(AppSession(grant, "")))
