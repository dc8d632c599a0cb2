"""UserService servicer: workspace members who sign in at the authorization endpoint."""

from __future__ import annotations

import asyncio

from sidecar._gen.statuspulse.auth.v1 import oauth_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import oauth_pb2_grpc as pb_grpc
from sidecar.admin.convert import timestamp
from sidecar.admin.paging import page
from sidecar.admin.rpc import Authenticator, admin_rpc
from sidecar.core.models import RequestContext
from sidecar.core.oauth_models import Member
from sidecar.core.scopes import sort_scopes
from sidecar.core.users import UserService


def user_pb(member: Member) -> pb.User:
    """A member as the API shows it (never the password hash)."""
    return pb.User(
        id=member.id,
        workspace=member.workspace,
        email=member.email,
        scopes=sort_scopes(member.scopes),
        create_time=timestamp(member.created_at),
        created_by=member.created_by,
        state=member.state,
        last_sign_in_time=timestamp(member.last_signin_at),
        disable_time=timestamp(member.disabled_at),
    )


class UserServicer(pb_grpc.UserServiceServicer):  # type: ignore[misc]
    """Admin API for members."""

    def __init__(self, service: UserService, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        self._svc = service

    @admin_rpc
    async def CreateUser(
        self, request: pb.CreateUserRequest, ctx: RequestContext
    ) -> pb.CreateUserResponse:
        member = await asyncio.to_thread(
            self._svc.create,
            ctx,
            workspace=request.workspace,
            email=request.email,
            password=request.password,
            scopes=list(request.scopes),
        )
        return pb.CreateUserResponse(user=user_pb(member))

    @admin_rpc
    async def ListUsers(
        self, request: pb.ListUsersRequest, ctx: RequestContext
    ) -> pb.ListUsersResponse:
        members = await asyncio.to_thread(self._svc.list, ctx, workspace=request.workspace)
        chunk, token = page(
            members,
            lambda m: (float(m.created_at), m.id),
            request.page_size,
            request.page_token,
        )
        return pb.ListUsersResponse(users=[user_pb(m) for m in chunk], next_page_token=token)

    @admin_rpc
    async def DisableUser(
        self, request: pb.DisableUserRequest, ctx: RequestContext
    ) -> pb.DisableUserResponse:
        done = await asyncio.to_thread(self._svc.disable, ctx, request.id)
        return pb.DisableUserResponse(user=user_pb(done.member), grants_revoked=done.grants_revoked)

    @admin_rpc
    async def EnableUser(
        self, request: pb.EnableUserRequest, ctx: RequestContext
    ) -> pb.EnableUserResponse:
        done = await asyncio.to_thread(self._svc.enable, ctx, request.id)
        return pb.EnableUserResponse(user=user_pb(done.member))

    @admin_rpc
    async def DeleteUser(
        self, request: pb.DeleteUserRequest, ctx: RequestContext
    ) -> pb.DeleteUserResponse:
        done = await asyncio.to_thread(self._svc.delete, ctx, request.id)
        return pb.DeleteUserResponse(user=user_pb(done.member), grants_revoked=done.grants_revoked)

    @admin_rpc
    async def ResetUserPassword(
        self, request: pb.ResetUserPasswordRequest, ctx: RequestContext
    ) -> pb.ResetUserPasswordResponse:
        done = await asyncio.to_thread(self._svc.reset_password, ctx, request.id, request.password)
        return pb.ResetUserPasswordResponse(
            user=user_pb(done.member), grants_revoked=done.grants_revoked
        )
