"""What the fuzzers found, pinned as plain tests against the fuzz mesh."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
from google.protobuf import field_mask_pb2
from tritonclient.grpc import service_pb2 as triton

from tensorway.batch.v1 import batch_service_pb2 as batch_pb
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tests.fuzz.calls import REGISTRY_ADMIN, method_path
from tests.fuzz.conftest import FuzzMesh
from tests.fuzz.jobs import TENANT
from tests.fuzz.outcomes import assert_client_error

INFERENCE = inference_pb.DESCRIPTOR.services_by_name["InferenceService"]
TRITON = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def refusal(
    mesh: FuzzMesh, service: str, path: str, request: bytes, metadata: Sequence[tuple[str, str]] = ()
) -> grpc.RpcError:
    """Call `path` on `service` with `request`, which it must refuse; the error."""
    with pytest.raises(grpc.RpcError) as caught, mesh.channel(service) as channel:
        channel.unary_unary(path)(request, timeout=10, metadata=metadata)
    assert_client_error(caught.value)
    return caught.value


@pytest.mark.parametrize("method", [INFERENCE.methods_by_name["Infer"], TRITON.methods_by_name["ModelInfer"]])
def test_a_huge_model_name_is_not_found_with_details_a_client_can_read(
    fuzz_mesh: FuzzMesh, method: object
) -> None:
    # The name came back whole in the status, past the metadata size clients accept.
    request = method.input_type._concrete_class(model_name="m" * 70_000)
    error = refusal(fuzz_mesh, "router", method_path(method), request.SerializeToString())
    assert error.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("method", ["CudaSharedMemoryStatus", "SystemSharedMemoryRegister", "LogSettings"])
def test_triton_methods_the_router_leaves_out_are_unimplemented(fuzz_mesh: FuzzMesh, method: str) -> None:
    # They raised the generated servicer's NotImplementedError, which became INTERNAL.
    error = refusal(fuzz_mesh, "router", method_path(TRITON.methods_by_name[method]), b"")
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED


# A string field (model_name, 1) holding bytes that are not UTF-8: no parser takes it.
NOT_UTF8 = b"\x0a\x01\xff"


@pytest.mark.parametrize(
    ("service", "method"),
    [
        ("router", INFERENCE.methods_by_name["GetModelMetadata"]),
        ("router", TRITON.methods_by_name["ModelInfer"]),
        ("orchestrator", INFERENCE.methods_by_name["Infer"]),
    ],
)
def test_bytes_no_parser_takes_are_invalid_argument(
    fuzz_mesh: FuzzMesh, service: str, method: object
) -> None:
    error = refusal(fuzz_mesh, service, method_path(method), NOT_UTF8)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_a_stream_request_no_parser_takes_is_invalid_argument(fuzz_mesh: FuzzMesh) -> None:
    # The deserializer's exception ended the stream with INTERNAL.
    with pytest.raises(grpc.RpcError) as caught, fuzz_mesh.channel("router") as channel:
        list(
            channel.stream_stream(method_path(INFERENCE.methods_by_name["StreamInfer"]))(
                iter([NOT_UTF8]), timeout=10
            )
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert_client_error(caught.value)


@pytest.mark.parametrize("seconds", [-(2**63), 2**63 - 1])
def test_a_timestamp_out_of_range_is_invalid_argument(fuzz_mesh: FuzzMesh, seconds: int) -> None:
    # ToDatetime's ValueError on an output-only create_time became INTERNAL.
    version = registry_pb.ModelVersion(platform="onnxruntime_onnx")
    version.create_time.seconds = seconds
    request = registry_pb.CreateModelVersionRequest(parent="models/simple", model_version=version)
    method = registry_pb.DESCRIPTOR.services_by_name["RegistryService"].methods_by_name["CreateModelVersion"]
    error = refusal(fuzz_mesh, "registry", method_path(method), request.SerializeToString(), REGISTRY_ADMIN)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("GetJob", batch_pb.GetJobRequest(name="jobs/\0")),
        ("ListJobs", batch_pb.ListJobsRequest(page_token="\0")),
        (
            "CreateJob",
            batch_pb.CreateJobRequest(
                job=batch_pb.Job(model="iris", model_version="\0", input_uri="s3://fuzz/x.jsonl")
            ),
        ),
    ],
)
def test_nul_in_a_batch_request_is_invalid_argument(
    fuzz_mesh: FuzzMesh, method: str, request_message: object
) -> None:
    # PostgreSQL refused the NUL inside the store, which answered INTERNAL (HTTP 500 through Envoy).
    rpc = batch_pb.DESCRIPTOR.services_by_name["BatchService"].methods_by_name[method]
    error = refusal(fuzz_mesh, "batch", method_path(rpc), request_message.SerializeToString(), TENANT)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        (
            "CreateModel",
            registry_pb.CreateModelRequest(model=registry_pb.Model(name="models/nul", description="\0")),
        ),
        (
            "UpdateModel",
            registry_pb.UpdateModelRequest(
                model=registry_pb.Model(name="models/iris", description="a\0"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            ),
        ),
        (
            "CreateModelVersion",
            registry_pb.CreateModelVersionRequest(
                parent="models/iris", model_version=registry_pb.ModelVersion(platform="\0")
            ),
        ),
    ],
)
def test_nul_in_a_registry_request_is_invalid_argument(
    fuzz_mesh: FuzzMesh, method: str, request_message: object
) -> None:
    # A NUL in a description reached PostgreSQL, which refused it: INTERNAL.
    rpc = registry_pb.DESCRIPTOR.services_by_name["RegistryService"].methods_by_name[method]
    error = refusal(
        fuzz_mesh, "registry", method_path(rpc), request_message.SerializeToString(), REGISTRY_ADMIN
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
