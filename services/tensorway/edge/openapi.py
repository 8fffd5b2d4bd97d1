"""OpenAPI 3 for the REST surface Envoy's transcoder serves, derived from the protos' HTTP rules.

The document is built from the same descriptor set and service list Envoy is given, so it cannot
drift from what the edge accepts: proto field names (the transcoder preserves them), proto3 JSON
types (64-bit integers as strings, enums by name, well-known types in their JSON forms) and
`google.rpc.Status` for every error. When two services bind the same method and path, the
transcoder serves the first service's binding, and so does the document. Each operation carries
the example request of `openapi_examples.yaml`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor_pb2

from tensorway.edge.bindings import VARIABLE, HttpBinding, http_bindings

FieldProto = descriptor_pb2.FieldDescriptorProto
STATUS = "google.rpc.Status"
JSON = "application/json"
EXAMPLES_FILE = Path(__file__).with_name("openapi_examples.yaml")
_INT32 = {FieldProto.TYPE_INT32, FieldProto.TYPE_SINT32, FieldProto.TYPE_SFIXED32}
_UINT32 = {FieldProto.TYPE_UINT32, FieldProto.TYPE_FIXED32}
_INT64 = {FieldProto.TYPE_INT64, FieldProto.TYPE_SINT64, FieldProto.TYPE_SFIXED64}
_UINT64 = {FieldProto.TYPE_UINT64, FieldProto.TYPE_FIXED64}
_WRAPPERS = {
    "google.protobuf.DoubleValue": FieldProto.TYPE_DOUBLE,
    "google.protobuf.FloatValue": FieldProto.TYPE_FLOAT,
    "google.protobuf.Int64Value": FieldProto.TYPE_INT64,
    "google.protobuf.UInt64Value": FieldProto.TYPE_UINT64,
    "google.protobuf.Int32Value": FieldProto.TYPE_INT32,
    "google.protobuf.UInt32Value": FieldProto.TYPE_UINT32,
    "google.protobuf.BoolValue": FieldProto.TYPE_BOOL,
    "google.protobuf.StringValue": FieldProto.TYPE_STRING,
    "google.protobuf.BytesValue": FieldProto.TYPE_BYTES,
}
# Well-known types whose proto3 JSON form is not an object of their fields.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated field paths."},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
}


class _Types:
    """Messages and enums of a descriptor set by full name, with their leading comments."""

    def __init__(self, files: Sequence[descriptor_pb2.FileDescriptorProto]) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[tuple[str, ...], str] = {}
        for file in files:
            comments = {
                tuple(location.path): location.leading_comments.strip()
                for location in file.source_code_info.location
                if location.leading_comments
            }
            prefix = f"{file.package}." if file.package else ""
            for i, message in enumerate(file.message_type):
                self._add_message(prefix + message.name, message, (4, i), comments)
            for i, enum in enumerate(file.enum_type):
                self.enums[prefix + enum.name] = enum
                self._comment(("enum", prefix + enum.name), comments.get((5, i)))
            for s, service in enumerate(file.service):
                for m, method in enumerate(service.method):
                    self._comment(
                        ("method", f"{prefix}{service.name}.{method.name}"), comments.get((6, s, 2, m))
                    )

    def _comment(self, key: tuple[str, ...], text: str | None) -> None:
        if text:
            self.comments[key] = text

    def _add_message(
        self,
        name: str,
        message: descriptor_pb2.DescriptorProto,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        self.messages[name] = message
        self._comment(("message", name), comments.get(path))
        for k, field in enumerate(message.field):
            self._comment(("field", name, field.name), comments.get((*path, 2, k)))
        for j, nested in enumerate(message.nested_type):
            self._add_message(f"{name}.{nested.name}", nested, (*path, 3, j), comments)
        for j, enum in enumerate(message.enum_type):
            self.enums[f"{name}.{enum.name}"] = enum
            self._comment(("enum", f"{name}.{enum.name}"), comments.get((*path, 4, j)))


class OpenApiBuilder:
    """Builds the document; `schemas` collects the component schemas the operations use."""

    def __init__(self, files: Sequence[descriptor_pb2.FileDescriptorProto]) -> None:
        self._types = _Types(files)
        self._files = files
        self.schemas: dict[str, Any] = {}

    def build(self, services: Sequence[str], title: str, version: str) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        # A path shape (variables blanked) keeps the variable names of its first binding, since
        # OpenAPI treats paths that differ only in variable names as one path.
        names_by_shape: dict[str, list[str]] = {}
        served, _ = http_bindings(self._files, services)
        operation_ids: dict[str, int] = {}
        for binding in served:
            path, variables = _openapi_template(binding.template)
            shape = VARIABLE.sub("{}", path)
            names = names_by_shape.setdefault(shape, [name for name, _ in variables])
            renamed = [(names[i], field_path) for i, (_, field_path) in enumerate(variables)]
            operation = self._operation(binding, renamed)
            # Operation ids are unique in a document: a method's further bindings count on.
            base_id = operation["operationId"]
            seen = operation_ids[base_id] = operation_ids.get(base_id, 0) + 1
            if seen > 1:
                operation["operationId"] = f"{base_id}_{seen}"
            paths.setdefault(_rename_variables(path, names), {})[binding.verb] = operation
        self.schemas.setdefault(STATUS, self._message_schema(STATUS))
        return {
            "openapi": "3.0.3",
            "info": {"title": title, "version": version},
            "paths": dict(sorted(paths.items())),
            "components": {
                "schemas": dict(sorted(self.schemas.items())),
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            },
            "security": [{"bearer": []}],
        }

    def _operation(self, binding: HttpBinding, variables: list[tuple[str, str]]) -> dict[str, Any]:
        request = binding.method.input_type.lstrip(".")
        response = binding.method.output_type.lstrip(".")
        bound = {field_path for _, field_path in variables}
        parameters: list[dict[str, Any]] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": f"Sets `{field_path}`.",
                "schema": {"type": "string"},
            }
            for name, field_path in variables
        ]
        operation: dict[str, Any] = {
            "operationId": f"{binding.service.rsplit('.', 1)[-1]}_{binding.method.name}",
            "tags": [binding.service.rsplit(".", 1)[-1]],
            "summary": binding.method.name,
            "description": self._types.comments.get(
                ("method", f"{binding.service}.{binding.method.name}"), ""
            ),
        }
        if binding.body == "*":
            schema = self._message_schema(request, exclude=bound)
            operation["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
        elif binding.body:
            field = self._field(request, binding.body)
            operation["requestBody"] = {
                "required": True,
                "content": {JSON: {"schema": self._field_schema(field)}},
            }
            parameters.extend(self._query_parameters(request, bound | {binding.body}))
        else:
            parameters.extend(self._query_parameters(request, bound))
        if parameters:
            operation["parameters"] = parameters
        success = (
            self._field_schema(self._field(response, binding.response_body))
            if binding.response_body
            else self._ref(response)
        )
        operation["responses"] = {
            "200": {"description": "OK", "content": {JSON: {"schema": success}}},
            "default": {
                "description": "An error: the gRPC status as JSON, with its HTTP code.",
                "content": {JSON: {"schema": self._ref(STATUS)}},
            },
        }
        return operation

    def _query_parameters(self, message: str, bound: set[str]) -> list[dict[str, Any]]:
        parameters = []
        taken = {field_path.split(".")[0] for field_path in bound}
        for field in self._types.messages[message].field:
            if field.name in taken:
                continue
            schema = self._field_schema(field)
            scalar = schema.get("items", schema) if schema.get("type") == "array" else schema
            if "$ref" in scalar or scalar.get("type") == "object" or not scalar:
                continue  # messages other than string-valued well-known types have no query form
            parameter: dict[str, Any] = {"name": field.name, "in": "query", "schema": schema}
            comment = self._types.comments.get(("field", message, field.name))
            if comment:
                parameter["description"] = comment
            parameters.append(parameter)
        return parameters

    def _field(self, message: str, name: str) -> FieldProto:
        for field in self._types.messages[message].field:
            if field.name == name:
                return field
        raise KeyError(f"{message} has no field {name}")

    def _ref(self, message: str) -> dict[str, Any]:
        if message in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message])
        if message in _WRAPPERS:
            return _scalar_schema(_WRAPPERS[message])
        if message not in self.schemas:
            self.schemas[message] = {}  # placeholder: breaks recursion through self-references
            self.schemas[message] = self._message_schema(message)
        return {"$ref": f"#/components/schemas/{message}"}

    def _message_schema(self, message: str, exclude: Collection[str] = ()) -> dict[str, Any]:
        proto = self._types.messages[message]
        properties = {
            field.name: self._described(self._field_schema(field), ("field", message, field.name))
            for field in proto.field
            if field.name not in exclude
        }
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        comment = self._types.comments.get(("message", message))
        if comment:
            schema["description"] = comment
        return schema

    def _described(self, schema: dict[str, Any], key: tuple[str, ...]) -> dict[str, Any]:
        comment = self._types.comments.get(key)
        if not comment:
            return schema
        if "$ref" in schema:  # OpenAPI 3.0 ignores siblings of $ref
            return {"allOf": [schema], "description": comment}
        return {**schema, "description": comment}

    def _field_schema(self, field: FieldProto) -> dict[str, Any]:
        if field.type == FieldProto.TYPE_MESSAGE:
            type_name = field.type_name.lstrip(".")
            entry = self._types.messages.get(type_name)
            if entry is not None and entry.options.map_entry:
                value = next(f for f in entry.field if f.name == "value")
                return {"type": "object", "additionalProperties": self._field_schema(value)}
            single = self._ref(type_name)
        elif field.type == FieldProto.TYPE_ENUM:
            enum = self._types.enums[field.type_name.lstrip(".")]
            single = {"type": "string", "enum": [value.name for value in enum.value]}
        else:
            single = _scalar_schema(field.type)
        if field.label == FieldProto.LABEL_REPEATED:
            return {"type": "array", "items": single}
        return single


def _scalar_schema(kind: int) -> dict[str, Any]:
    if kind in (FieldProto.TYPE_DOUBLE, FieldProto.TYPE_FLOAT):
        return {"type": "number"}
    if kind in _INT32:
        return {"type": "integer", "format": "int32"}
    if kind in _UINT32:
        return {"type": "integer", "format": "int32", "minimum": 0}
    if kind in _INT64:
        return {"type": "string", "format": "int64", "pattern": r"^-?[0-9]+$"}
    if kind in _UINT64:
        return {"type": "string", "format": "uint64", "pattern": r"^[0-9]+$"}
    if kind == FieldProto.TYPE_BOOL:
        return {"type": "boolean"}
    if kind == FieldProto.TYPE_BYTES:
        return {"type": "string", "format": "byte"}
    return {"type": "string"}


def _openapi_template(template: str) -> tuple[str, list[tuple[str, str]]]:
    """An HTTP rule template as an OpenAPI path, and (variable, field path) pairs in order.

    ``{name=models/*/versions/*}`` spans several segments, which an OpenAPI variable cannot, so
    each ``*`` becomes its own variable named after the collection before it (``model``,
    ``version``); a plain ``{model_name}`` stays as it is.
    """
    variables: list[tuple[str, str]] = []

    def expand(match: re.Match[str]) -> str:
        field_path, pattern = match.group(1), match.group(2)
        if not pattern or pattern == "*":
            name = field_path.replace(".", "_")
            variables.append((name, field_path))
            return "{" + name + "}"
        segments: list[str] = []
        for segment in pattern.split("/"):
            if segment == "*":
                collection = segments[-1] if segments else field_path
                name = collection[:-1] if collection.endswith("s") else collection
                variables.append((name, field_path))
                segments.append("{" + name + "}")
            else:
                segments.append(segment)
        return "/".join(segments)

    return VARIABLE.sub(expand, template), variables


def _rename_variables(path: str, names: list[str]) -> str:
    replacements = iter(names)
    return VARIABLE.sub(lambda _: "{" + next(replacements) + "}", path)


def load_examples(path: Path = EXAMPLES_FILE) -> dict[str, Any]:
    """Example requests by operation, ``"VERB /path"`` as the document names it: ``parameters``
    (path and query values by name) and ``body`` (the request body's JSON)."""
    examples: dict[str, Any] = yaml.safe_load(path.read_text())
    return examples


def add_examples(document: dict[str, Any], examples: Mapping[str, Any]) -> None:
    """Put each operation's example on its parameters and request body, where Swagger UI's "Try it
    out" and schemathesis take them from."""
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            example = examples.get(f"{verb.upper()} {path}")
            if example is None:
                continue
            values = example.get("parameters") or {}
            for parameter in operation.get("parameters", []):
                if parameter["name"] in values:
                    parameter["example"] = values[parameter["name"]]
            if "body" in example and "requestBody" in operation:
                operation["requestBody"]["content"][JSON]["example"] = example["body"]


def build_openapi(
    descriptor_set: bytes,
    services: Sequence[str],
    *,
    title: str = "tensorway",
    version: str = "v1",
    examples: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3 document of ``services``' HTTP bindings in a serialized FileDescriptorSet, with
    ``examples`` (by default `openapi_examples.yaml`'s) on its operations."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file
    document = OpenApiBuilder(files).build(services, title, version)
    add_examples(document, load_examples() if examples is None else examples)
    return document
