"""The OpenAPI document and the descriptor set Envoy transcodes with, both derived from the
protos' HTTP rules; and schemathesis against the live REST surface through Envoy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.openapi import from_dict

from tensorway import protogen
from tensorway.edge.bindings import http_bindings, transcoder_descriptor_set
from tensorway.edge.config import PUBLIC_SERVICES
from tensorway.edge.openapi import build_openapi

if TYPE_CHECKING:
    from tests.edge_mesh import Edge


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    target = tmp_path_factory.mktemp("descriptors") / "api.pb"
    return protogen.write_descriptor_set(protogen.project_root(), target).read_bytes()


def test_the_first_service_keeps_a_path_two_services_bind(descriptor_set: bytes) -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file
    served, shadowed = http_bindings(files, PUBLIC_SERVICES)
    assert {(b.service.rsplit(".", 1)[1], b.method.name, b.verb) for b in shadowed} == {
        ("RegistryService", "GetModel", "get"),
        ("RegistryService", "GetModelVersion", "get"),
    }
    assert len({b.shape for b in served}) == len(served)

    pruned, _ = transcoder_descriptor_set(descriptor_set, PUBLIC_SERVICES)
    methods = {
        f"{file.package}.{service.name}/{method.name}": method
        for file in descriptor_pb2.FileDescriptorSet.FromString(pruned).file
        for service in file.service
        for method in service.method
    }
    assert not methods["tensorway.registry.v1.RegistryService/GetModel"].options.HasExtension(
        annotations_pb2.http
    )
    metadata = methods["tensorway.inference.v1.InferenceService/GetModelMetadata"].options.Extensions[
        annotations_pb2.http
    ]
    assert metadata.get == "/v1/models/{model_name}"
    assert [b.get for b in metadata.additional_bindings] == [
        "/v1/models/{model_name}/versions/{model_version}"
    ]
    update = methods["tensorway.registry.v1.RegistryService/UpdateModel"].options.Extensions[
        annotations_pb2.http
    ]
    assert update.patch == "/v1/{model.name=models/*}"


def test_the_document_follows_the_transcoder(descriptor_set: bytes) -> None:
    document = build_openapi(transcoder_descriptor_set(descriptor_set, PUBLIC_SERVICES)[0], PUBLIC_SERVICES)
    paths = document["paths"]
    infer = paths["/v1/models/{model_name}:infer"]["post"]
    assert infer["operationId"] == "InferenceService_Infer"
    assert infer["description"] == "Runs one inference request."
    schemas = document["components"]["schemas"]
    request = infer["requestBody"]["content"]["application/json"]["schema"]
    assert "model_name" not in request["properties"]  # bound by the path
    tensor = schemas["tensorway.common.v1.Tensor"]["properties"]
    assert tensor["shape"] == {
        "type": "array",
        "items": {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    } | ({"description": tensor["shape"]["description"]} if "description" in tensor["shape"] else {})
    # A multi-segment variable becomes one OpenAPI variable per segment, named as the first
    # binding of the same path names it.
    patch = paths["/v1/models/{model_name}"]["patch"]
    assert [p["name"] for p in patch["parameters"] if p["in"] == "path"] == ["model_name"]
    assert "update_mask" in [p["name"] for p in patch["parameters"] if p["in"] == "query"]
    assert (
        "get" in paths["/v1/models/{model}/versions/{version}:transitionStage"]
        or "post" in paths["/v1/models/{model}/versions/{version}:transitionStage"]
    )
    assert paths["/v1/jobs"]["get"]["responses"]["default"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/google.rpc.Status"
    }
    assert document["security"] == [{"bearer": []}]


def test_schemathesis_finds_no_server_error_and_no_response_off_the_document(edge: Edge) -> None:
    document = json.loads(Path(edge.openapi).read_text())
    schema = from_dict(document)
    headers = edge.headers("fuzz")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    # Deleting is left out: it would take the demo models from the tests that run after.
    operations = [operation for operation in operations if operation.method.upper() != "DELETE"]
    assert len(operations) >= 20
    calls = 0
    for operation in operations:
        found, made = _exercise(operation, edge, headers, checks)
        failures.extend(found)
        calls += made
    assert calls >= 2 * len(operations)
    assert not failures, "\n\n".join(failures)


def _exercise(
    operation: Any, edge: Edge, headers: dict[str, str], checks: list[Any]
) -> tuple[list[str], int]:
    """Call one operation with a few generated requests; the check failures, as text, and the calls."""
    failures: list[str] = []
    calls: list[int] = []

    @settings(
        max_examples=4,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def call(case: Any) -> None:
        calls.append(1)
        try:
            case.call_and_validate(
                base_url=edge.url, session=edge.http, headers=headers, checks=checks, verify=str(edge.ca)
            )
        except AssertionError as failure:
            failures.append(f"{operation.label}: {str(failure)[:800]}")

    call()
    return failures, len(calls)
