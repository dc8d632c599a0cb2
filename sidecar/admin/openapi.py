"""The OpenAPI 3.1 document of the HTTP/JSON admin API, generated from the protos' descriptors and
their ``google.api.http`` annotations (``sidecar.admin.http_rules``): the same bindings the
control plane serves, so the document cannot describe a route the server lacks.

Schemas follow the proto3 JSON mapping as the server (and Envoy's transcoder) print it: fields by
their ``json_name``, enums by name, Timestamps as RFC 3339 strings, 64-bit integers as decimal
strings (numbers are accepted on input), every field without presence always present.

``python -m sidecar.admin.openapi`` prints it (``make openapi`` writes docs/openapi.json)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

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
            properties[field.json_name] = self.field(field)
            if field.is_repeated or field.message_type is None:
                required.append(field.json_name)
        return {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }

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
