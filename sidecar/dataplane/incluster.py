"""``statuspulse.auth.v1.AuthorizationService``: Authorize and Introspect for in-cluster services,
decided by the same engine, replica and policy as Envoy's Check."""

from __future__ import annotations

import grpc

from sidecar._gen.statuspulse.auth.v1 import authorization_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import authorization_pb2_grpc as pb_grpc
from sidecar.authz.decision import Outcome
from sidecar.authz.engine import CheckInput, Engine
from sidecar.core.errors import InvalidArgument
from sidecar.core.scopes import parse_scopes, sort_scopes
from sidecar.dataplane.envoy_check import Observer


class AuthorizationServicer(pb_grpc.AuthorizationServiceServicer):  # type: ignore[misc]
    """Direct checks over gRPC (no Envoy)."""

    def __init__(self, engine: Engine, observers: list[Observer] | None = None) -> None:
        self.engine = engine
        self.observers = observers if observers is not None else []

    def Authorize(
        self, request: pb.AuthorizeRequest, context: grpc.ServicerContext
    ) -> pb.AuthorizeResponse:
        view = CheckInput(
            method=request.method.upper(),
            path=request.path,
            host=request.host,
            headers={},
            context={},
        )
        if request.required_scopes:
            try:
                scopes = parse_scopes(request.required_scopes, "required_scopes")
            except InvalidArgument as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
            decision = self.engine.authorize(request.credential, scopes, request.workspace)
        elif request.method and request.path:
            decision = self.engine.authorize_route(
                request.credential, view.method, view.path, view.host, request.workspace
            )
        else:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "required_scopes, or method and path, must be set",
            )
        for observe in self.observers:
            observe(decision, view, context.peer(), 0.0)
        # A refused credential says nothing about itself (its identity is for the audit trail).
        ident = decision.identity if decision.outcome is not Outcome.UNAUTHENTICATED else None
        return pb.AuthorizeResponse(
            allowed=decision.allowed,
            reason=decision.reason.value,
            http_status=decision.http_status,
            workspace=ident.workspace if ident else "",
            key_id=ident.id if ident and ident.kind == "api_key" else "",
            subject=ident.subject if ident else "",
            scopes=sort_scopes(ident.scopes) if ident else [],
            decision_id=decision.decision_id,
        )

    def Introspect(
        self, request: pb.IntrospectRequest, context: grpc.ServicerContext
    ) -> pb.IntrospectResponse:
        decision = self.engine.introspect(request.credential)
        ident = decision.identity
        if not decision.allowed or ident is None:
            # Like RFC 7662: an inactive credential says nothing more about itself.
            return pb.IntrospectResponse(active=False, reason=decision.reason.value)
        response = pb.IntrospectResponse(
            active=True,
            reason=decision.reason.value,
            workspace=ident.workspace,
            scopes=sort_scopes(ident.scopes),
            key_id=ident.id if ident.kind == "api_key" else "",
            subject=ident.subject,
            client_id=ident.client_id,
            kind=ident.kind,
        )
        response.expire_time.FromSeconds(int(ident.expires_at))
        return response
