"""What the fuzzers found, pinned as plain tests against the fuzz mesh."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.grpc import service_pb2 as triton

from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tests.fuzz.calls import method_path
from tests.fuzz.conftest import FuzzMesh
from tests.fuzz.outcomes import assert_client_error

INFERENCE = inference_pb.DESCRIPTOR.services_by_name["InferenceService"]
TRITON = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def refusal(mesh: FuzzMesh, service: str, path: str, request: bytes) -> grpc.RpcError:
    """Call `path` on `service` with `request`, which it must refuse; the error."""
    with pytest.raises(grpc.RpcError) as caught, mesh.channel(service) as channel:
        channel.unary_unary(path)(request, timeout=10)
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


@pytest.mark.parametrize(
    "method", ["ModelStatistics", "RepositoryModelLoad", "CudaSharedMemoryStatus", "LogSettings"]
)
def test_triton_methods_the_router_leaves_out_are_unimplemented(fuzz_mesh: FuzzMesh, method: str) -> None:
    # They raised the generated servicer's NotImplementedError, which became INTERNAL.
    error = refusal(fuzz_mesh, "router", method_path(TRITON.methods_by_name[method]), b"")
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED
