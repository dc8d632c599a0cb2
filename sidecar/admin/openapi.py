"""The OpenAPI 3.1 document of the HTTP/JSON admin API, generated from the protos' descriptors and
their ``google.api.http`` annotations (``sidecar.admin.http_rules``): the same bindings the
control plane serves, so the document cannot describe a route the server lacks.

Schemas follow the proto3 JSON mapping as the server (and Envoy's transcoder) print it: fields by
their ``json_name``, enums by name, Timestamps as RFC 3339 strings, 64-bit integers as decimal
strings (numbers are accepted on input), every field without presence always present.

``python -m sidecar.admin.openapi`` prints it (``make openapi`` writes docs/openapi.json)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from sidecar.admin.http_rules import Binding, bindings, field_at

TITLE = "StatusPulse Auth admin API"
VERSION = "v1"
PROBLEM = {"$ref": "#/components/schemas/Problem"}
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64}
_INT64 |= {FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int32", "minimum": 0},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
_PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem document; `code` is the stable error code.",
    "required": ["type", "title", "status", "detail", "code", "request_id"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "request_id": {"type": "string"},
        "grpc_status": {"type": "string"},
        "field": {"type": "string"},
    },
}


# FileDescriptorProto field numbers (google/protobuf/descriptor.proto) in SourceCodeInfo paths.
_MESSAGE, _SERVICE, _FIELD, _METHOD, _NESTED = 4, 6, 2, 2, 3


@functools.cache
def comments() -> dict[str, str]:
    """Leading comments of protos/ by full name (``pkg.Message``, ``pkg.Message.field``,
    ``pkg.Service.Method``), from the descriptor set scripts/genproto.py ships with the code."""
    data = resources.files("sidecar._gen.statuspulse.auth.v1").joinpath("descriptors.binpb")
    files = descriptor_pb2.FileDescriptorSet.FromString(data.read_bytes())
    found: dict[str, str] = {}
    for file in files.file:
        names = _names(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = " ".join(line.strip() for line in location.leading_comments.splitlines())
            if name and text:
                found[name] = text
    return found


def _names(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """SourceCodeInfo paths of a file's services, methods, messages and fields -> full names."""
    names: dict[tuple[int, ...], str] = {}
    for s, service in enumerate(file.service):
        names[(_SERVICE, s)] = f"{file.package}.{service.name}"
        for m, method in enumerate(service.method):
            names[(_SERVICE, s, _METHOD, m)] = f"{file.package}.{service.name}.{method.name}"

    def messages(
        items: Sequence[descriptor_pb2.DescriptorProto], prefix: str, path: tuple[int, ...]
    ) -> None:
        for i, message in enumerate(items):
            full, here = f"{prefix}.{message.name}", (*path, i)
            names[here] = full
            for f, field in enumerate(message.field):
                names[(*here, _FIELD, f)] = f"{full}.{field.name}"
            messages(message.nested_type, full, (*here, _NESTED))

    messages(file.message_type, file.package, (_MESSAGE,))
    return names


def _described(schema: dict[str, Any], full_name: str) -> dict[str, Any]:
    text = comments().get(full_name)
    return {**schema, "description": text} if text else schema


class _Schemas:
    """Component schemas, added as messages and enums are referenced."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {"Problem": _PROBLEM_SCHEMA}

    def ref(self, message: Descriptor, *, omit: Sequence[str] = (), suffix: str = "") -> Any:
        name = message.name + suffix
        if name not in self.components:
            self.components[name] = {}  # placeholder: messages may refer to themselves
            self.components[name] = self._object(message, omit)
        return {"$ref": f"#/components/schemas/{name}"}

    def _object(self, message: Descriptor, omit: Sequence[str]) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        required: list[str] = []
        for field in message.fields:
            if field.name in omit:
                continue
            properties[field.json_name] = _described(self.field(field), field.full_name)
            if field.is_repeated or field.message_type is None:
                required.append(field.json_name)
        schema = {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }
        return _described(schema, message.full_name)

    def field(self, field: FieldDescriptor) -> Any:
        nested = field.message_type
        if nested is not None and nested.GetOptions().map_entry:
            value = self.single(nested.fields_by_name["value"])
            return {"type": "object", "additionalProperties": value}
        single = self.single(field)
        return {"type": "array", "items": single} if field.is_repeated else single

    def single(self, field: FieldDescriptor) -> Any:
        if field.message_type is not None:
            if field.message_type.full_name == "google.protobuf.Timestamp":
                return {"type": "string", "format": "date-time"}
            return self.ref(field.message_type)
        if field.enum_type is not None:
            return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        if field.type in _INT64:
            return {"type": ["string", "integer"], "format": "int64", "pattern": "^-?[0-9]{1,18}$"}
        return dict(_SCALARS[field.type])


def _parameter(name: str, where: str, field: FieldDescriptor, schemas: _Schemas) -> Any:
    schema = schemas.field(field)
    if where == "path":
        schema = {"type": "string", "minLength": 1, "pattern": "^[^/:]+$"}
    return {"name": name, "in": where, "required": where == "path", "schema": schema}


def operation(binding: Binding, schemas: _Schemas) -> dict[str, Any]:
    """One OpenAPI operation for a binding."""
    params = [
        _parameter(name, "path", field_at(binding.input, name), schemas)
        for name in binding.variables
    ]
    params += [_parameter(n, "query", f, schemas) for n, f in binding.query_fields()]
    op: dict[str, Any] = {
        "operationId": binding.operation_id,
        "summary": f"{binding.method.containing_service.name}.{binding.method.name}",
        "description": comments().get(binding.method.full_name, ""),
        "tags": [binding.method.containing_service.name],
        "parameters": params,
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": schemas.ref(binding.output)}},
            },
            "default": {
                "description": "An error (RFC 9457 problem document)",
                "content": {"application/problem+json": {"schema": PROBLEM}},
            },
        },
    }
    if binding.body == "*":
        omit = binding.variables  # path variables win over the body: not part of it
        body = schemas.ref(binding.input, omit=omit, suffix="Body" if omit else "")
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    elif binding.body:
        body = schemas.field(field_at(binding.input, binding.body))
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def document(found: Sequence[Binding] | None = None) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for binding in bindings() if found is None else found:
        paths.setdefault(binding.template, {})[binding.verb.lower()] = operation(binding, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": (
                "Generated from protos/ and their google.api.http annotations "
                "(make openapi). Authenticate with `Authorization: Bearer <API key>`."
            ),
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A StatusPulse API key (spk_...)",
                }
            },
            "schemas": dict(sorted(schemas.components.items())),
        },
    }


def render() -> str:
    """The document as committed in docs/openapi.json (stable key order, trailing newline)."""
    return json.dumps(document(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
