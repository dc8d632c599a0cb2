"""The admin API over HTTP/JSON, derived from the ``google.api.http`` annotations of protos/
(``sidecar.admin.http_rules``): each request becomes the RPC's request message, is authenticated
by the same seam as a gRPC call (``sidecar.admin.rpc.authenticated``) and runs the very servicer
method gRPC runs; its response is the proto3 JSON mapping of the response message, with the
fields' ``json_name`` (snake_case, as ``spauth -o json``). Errors are RFC 9457 problem documents
(``sidecar.admin.problems``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from prometheus_client import Counter
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from sidecar.admin.errors import grpc_code
from sidecar.admin.http_rules import Binding
from sidecar.admin.problems import error_problem, problem
from sidecar.admin.rpc import authenticated, bearer_token, core_method, request_id
from sidecar.core.errors import InvalidArgument, SpauthError

log = logging.getLogger("sidecar.http.admin")
MAX_BODY = 64 * 1024
MAX_DETAIL = 300
PREFIX = "/v1/"
_ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class AdminHttpApi:
    """Dispatches ``/v1/...`` requests to the servicer of the matching binding."""

    def __init__(
        self,
        bindings: Sequence[Binding],
        servicers: Mapping[str, Any],
        calls: Counter | None = None,
    ) -> None:
        missing = {b.method.containing_service.full_name for b in bindings} - set(servicers)
        if missing:
            raise ValueError(f"no servicer for {', '.join(sorted(missing))}")
        self.bindings = list(bindings)
        self.servicers = dict(servicers)
        # spauth_admin_calls_total{method,code}: the gRPC calls' counter, so a call counts the
        # same whichever transport carried it (only bound methods: the label set is fixed).
        self.calls = calls

    def routes(self) -> list[BaseRoute]:
        # Every method reaches dispatch, so an unbound one gets a problem document too.
        return [Route(PREFIX + "{rest:path}", self.dispatch, methods=list(_ALL_METHODS))]

    def match(self, verb: str, path: str) -> tuple[Binding | None, dict[str, str], list[str]]:
        """The binding for ``verb path`` and its path variables, or None and the verbs the path
        accepts (for a 405's ``Allow``)."""
        allowed: list[str] = []
        for binding in self.bindings:
            found = binding.pattern.fullmatch(path)
            if found is None:
                continue
            if binding.verb == verb or (verb == "HEAD" and binding.verb == "GET"):
                values = {name: found.group(f"_{i}") for i, name in enumerate(binding.variables)}
                return binding, values, []
            allowed.append(binding.verb)
        return None, {}, allowed

    async def unrouted(self, request: Request, exc: Exception) -> Response:
        """Starlette's own 404 (a path its router cannot even match, e.g. with a newline):
        a problem document under /v1/, Starlette's plain answer elsewhere."""
        if not request.scope["path"].startswith(PREFIX) or not isinstance(exc, HTTPException):
            return PlainTextResponse("Not Found", status_code=404)
        return problem(exc.status_code, "not_found", _no_route(request), _request_id(request))

    async def dispatch(self, request: Request) -> Response:
        rid = _request_id(request)
        binding, values, allowed = self.match(request.method, request.scope["path"])
        if binding is None:
            status, code = (405, "method_not_allowed") if allowed else (404, "not_found")
            headers = {"allow": ", ".join(sorted(set(allowed)))} if allowed else None
            return problem(status, code, _no_route(request), rid, headers=headers)
        response = await self._call(binding, values, request, rid)
        log.info(
            "admin http call",
            extra={
                "rpc": binding.method.full_name,
                "status": response.status_code,
                "request_id": rid,
            },
        )
        return response

    async def _call(
        self, binding: Binding, values: dict[str, str], request: Request, rid: str
    ) -> Response:
        servicer = self.servicers[binding.method.containing_service.full_name]
        try:
            given = request.headers.get("authorization")
            token = bearer_token((("authorization", given),) if given is not None else ())
            peer = request.client.host if request.client else ""  # proxy headers: not trusted
            ctx = await authenticated(servicer.authenticator, token, rid, peer)
            message = build_request(
                binding, values, list(request.query_params.multi_items()), await _body(request)
            )
            result = await core_method(getattr(servicer, binding.method.name))(
                servicer, message, ctx
            )
        except SpauthError as exc:
            log.info("admin http call refused", extra={"code": exc.code, "request_id": rid})
            self._count(binding, grpc_code(exc).name)
            return error_problem(exc, rid)
        except Exception:
            log.exception("admin http call failed", extra={"request_id": rid})
            self._count(binding, "INTERNAL")
            return error_problem(SpauthError("internal"), rid)
        self._count(binding, "OK")
        body = json_format.MessageToDict(result, always_print_fields_with_no_presence=True)
        return JSONResponse(body, headers={"x-request-id": rid, "cache-control": "no-store"})

    def _count(self, binding: Binding, code: str) -> None:
        if self.calls is not None:
            service = binding.method.containing_service.name
            self.calls.labels(f"{service}/{binding.method.name}", code).inc()


def _request_id(request: Request) -> str:
    """The caller's ``x-request-id`` when well-formed, else a fresh one (the gRPC rule)."""
    given = request.headers.get("x-request-id")
    return request_id((("x-request-id", given),) if given is not None else ())


def _no_route(request: Request) -> str:
    path = request.scope["path"]
    shown = repr(path if len(path) <= 200 else path[:200] + "…")
    return f"no admin API route for {request.method[:10]} {shown}"


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_BODY:
        raise InvalidArgument("body", f"must be at most {MAX_BODY} bytes")
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise InvalidArgument("body", f"must be at most {MAX_BODY} bytes")
    return data


def build_request(
    binding: Binding, values: Mapping[str, str], query: Sequence[tuple[str, str]], body: bytes
) -> Message:
    """The RPC's request message from path variables, query parameters and the JSON body
    (google.api.http rules: path variables win; without a body, other fields are the query)."""
    data: dict[str, Any] = {}
    if binding.body:
        parsed = _json(body)
        if binding.body == "*":
            data = parsed
        else:
            data[binding.body] = parsed
    elif body.strip():
        raise InvalidArgument("body", f"{binding.verb} {binding.template} takes no body")
    allowed = dict(binding.query_fields())
    for name, value in query:
        field = allowed.get(name)
        if field is None:
            raise InvalidArgument(name, "unknown query parameter")
        _put(data, name, value, repeated=field.is_repeated)
    for name, value in values.items():
        _put(data, name, value, repeated=False, replace=True)
    message = message_factory.GetMessageClass(binding.input)()
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        # The parser quotes the offending value: keep the message short whatever was sent.
        detail = str(exc)
        detail = detail if len(detail) <= MAX_DETAIL else detail[:MAX_DETAIL] + "…"
        raise InvalidArgument("body" if binding.body else "query", detail) from None
    return message


def _json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidArgument("body", "is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument("body", "must be a JSON object")
    return parsed


def _put(
    data: dict[str, Any], path: str, value: str, *, repeated: bool, replace: bool = False
) -> None:
    """Set ``data[a][b]`` for ``path`` "a.b" (appending for a repeated field)."""
    *parents, leaf = path.split(".")
    for name in parents:
        nested = data.setdefault(name, {})
        if not isinstance(nested, dict):
            raise InvalidArgument(path, "conflicts with the body")
        data = nested
    if repeated:
        data.setdefault(leaf, []).append(value)
    elif leaf in data and not replace:
        raise InvalidArgument(path, "given more than once")
    else:
        data[leaf] = value
