"""SigningKeyService servicer: the operator lists and rotates the JWT signing keys."""

from __future__ import annotations

import asyncio

from sidecar._gen.statuspulse.auth.v1 import oauth_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import oauth_pb2_grpc as pb_grpc
from sidecar.admin.convert import timestamp
from sidecar.admin.rpc import Authenticator, admin_rpc
from sidecar.core.clock import Clock
from sidecar.core.models import RequestContext
from sidecar.core.oauth_models import SigningKey
from sidecar.oauth.key_admin import SigningKeyAdmin, key_state


def signing_key_pb(key: SigningKey, now: float) -> pb.SigningKey:
    """A key's public facts (never its private part)."""
    return pb.SigningKey(
        kid=key.kid,
        alg=key.alg,
        state=key_state(key, now),
        create_time=timestamp(key.created_at),
        activate_time=timestamp(key.activates_at),
        supersede_time=timestamp(key.superseded_at),
    )


class SigningKeyServicer(pb_grpc.SigningKeyServiceServicer):  # type: ignore[misc]
    """Admin API for the signing keys (operator only)."""

    def __init__(self, admin: SigningKeyAdmin, authenticator: Authenticator, clock: Clock) -> None:
        self.authenticator = authenticator
        self._admin = admin
        self._clock = clock

    @admin_rpc
    async def ListSigningKeys(
        self, request: pb.ListSigningKeysRequest, ctx: RequestContext
    ) -> pb.ListSigningKeysResponse:
        keys = await asyncio.to_thread(self._admin.list, ctx)
        now = self._clock.now()
        return pb.ListSigningKeysResponse(keys=[signing_key_pb(k, now) for k in keys])

    @admin_rpc
    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, ctx: RequestContext
    ) -> pb.RotateSigningKeyResponse:
        done = await asyncio.to_thread(self._admin.rotate, ctx, immediate=request.immediate)
        return pb.RotateSigningKeyResponse(
            key=signing_key_pb(done.key, self._clock.now()), retired_kids=done.retired
        )
