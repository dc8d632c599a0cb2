"""The HTTP bindings of the admin API, read from the ``google.api.http`` annotations in protos/
(https://github.com/googleapis/googleapis/blob/master/google/api/http.proto). Both the control
plane's HTTP routes and the OpenAPI document are derived from these, so an RPC gains an HTTP
route by gaining an annotation, and nothing else.

Supported template syntax: literal segments, ``{field}`` variables (a top-level field of the
request, matching one segment) and a final ``:verb``. Anything else (``{a.b}``, ``{x=**}``) is
refused at start-up (``RuleError``): the OpenAPI document and its tools could not follow it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2, audit_pb2, oauth_pb2, webhooks_pb2

_VERBS = ("get", "post", "put", "patch", "delete")
_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_LITERAL = re.compile(r"[A-Za-z0-9._~-]+")


class RuleError(ValueError):
    """An annotation this gateway cannot serve (named by RPC)."""


@dataclass(frozen=True, slots=True)
class Binding:
    """One HTTP method + path template bound to one RPC."""

    method: MethodDescriptor
    verb: str  # upper case: GET, POST, ...
    template: str  # e.g. /v1/keys/{id}:replace
    body: str  # "" (no body: the other fields are query parameters), "*", or a field name
    variables: tuple[str, ...]  # field paths bound from the path, in order
    pattern: re.Pattern[str]
    index: int = 0  # 0 for the main rule, n for the n-th additional binding

    @property
    def input(self) -> Descriptor:
        return self.method.input_type

    @property
    def output(self) -> Descriptor:
        return self.method.output_type

    @property
    def operation_id(self) -> str:
        """Unique per binding: the RPC name, suffixed for additional bindings."""
        return self.method.name + (str(self.index + 1) if self.index else "")

    def query_fields(self) -> list[tuple[str, FieldDescriptor]]:
        """The (dotted path, leaf field) pairs a client may send as query parameters."""
        if self.body == "*":
            return []
        out: list[tuple[str, FieldDescriptor]] = []
        _leaves(self.input, "", out)
        bound = set(self.variables) | ({self.body} if self.body else set())
        return [(p, f) for p, f in out if p not in bound and p.split(".")[0] not in bound]


def _leaves(message: Descriptor, prefix: str, out: list[tuple[str, FieldDescriptor]]) -> None:
    for field in message.fields:
        path = prefix + field.name
        nested = field.message_type
        if (
            nested is not None
            and nested.full_name != "google.protobuf.Timestamp"
            and not nested.GetOptions().map_entry
            and not field.is_repeated
        ):
            _leaves(nested, path + ".", out)
        elif nested is None or nested.full_name == "google.protobuf.Timestamp":
            out.append((path, field))


def field_at(message: Descriptor, path: str) -> FieldDescriptor:
    """The field a dotted path names; RuleError when there is none."""
    descriptor: Descriptor | None = message
    field: FieldDescriptor | None = None
    for name in path.split("."):
        if descriptor is None or name not in descriptor.fields_by_name:
            raise RuleError(f"{message.full_name} has no field {path!r}")
        field = descriptor.fields_by_name[name]
        descriptor = field.message_type
    assert field is not None
    return field


def compile_template(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """A path template as an anchored regex with one group per variable (``_0``, ``_1``...)."""
    path, verb = template, ""
    if ":" in template.rsplit("/", 1)[-1]:
        path, verb = template.rsplit(":", 1)
    if not path.startswith("/"):
        raise RuleError(f"{template!r}: must start with /")
    parts: list[str] = []
    names: list[str] = []
    for segment in path[1:].split("/"):
        variable = _VARIABLE.fullmatch(segment)
        if variable is not None:
            parts.append(f"(?P<_{len(names)}>[^/:]+)")
            names.append(variable.group(1))
        elif _LITERAL.fullmatch(segment):
            parts.append(re.escape(segment))
        else:
            raise RuleError(f"{template!r}: unsupported segment {segment!r}")
    suffix = ""
    if verb:
        if not _LITERAL.fullmatch(verb):
            raise RuleError(f"{template!r}: unsupported verb {verb!r}")
        suffix = ":" + re.escape(verb)
    return re.compile("/" + "/".join(parts) + suffix), tuple(names)


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule, index: int = 0) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind not in _VERBS:
        raise RuleError(f"{method.full_name}: unsupported pattern {kind!r}")
    template = str(getattr(rule, kind))
    pattern, variables = compile_template(template)
    for name in variables:
        field_at(method.input_type, name)
    if rule.body not in ("", "*"):
        field_at(method.input_type, rule.body)
    if kind in ("get", "delete") and rule.body:
        raise RuleError(f"{method.full_name}: {kind.upper()} takes no body")
    return Binding(method, kind.upper(), template, rule.body, variables, pattern, index)


def method_bindings(method: MethodDescriptor) -> list[Binding]:
    """The bindings of one RPC (none when it has no annotation or streams)."""
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    if method.client_streaming or method.server_streaming:
        raise RuleError(f"{method.full_name}: streaming RPCs have no HTTP binding here")
    rule = options.Extensions[annotations_pb2.http]
    extra = [_binding(method, r, i + 1) for i, r in enumerate(rule.additional_bindings)]
    return [_binding(method, rule), *extra]


def bindings(services: Iterable[str] | None = None) -> list[Binding]:
    """Every binding of the admin services, in declaration order."""
    found: list[Binding] = []
    for name in services or ADMIN_SERVICES:
        for method in service(name).methods:
            found.extend(method_bindings(method))
    return found


def service(full_name: str) -> ServiceDescriptor:
    """A service of protos/ by full name (its module is imported above, so the pool has it)."""
    return descriptor_pool.Default().FindServiceByName(full_name)


# The admin surface: what the HTTP API and the OpenAPI document cover. Replication and audit
# ingestion are sidecar-to-control-plane streams, as is usage reporting (UsageService), and
# AuthorizationService is the sidecar's.
ADMIN_SERVICES = (
    "statuspulse.auth.v1.ApiKeyService",
    "statuspulse.auth.v1.OAuthAppService",
    "statuspulse.auth.v1.UserService",
    "statuspulse.auth.v1.AuditService",
    "statuspulse.auth.v1.WebhookService",
    "statuspulse.auth.v1.SigningKeyService",
)
# Imported for their side effect: they add the admin services to the default pool.
_MODULES = (api_keys_pb2, audit_pb2, oauth_pb2, webhooks_pb2)
