"""What every fuzzed call must end in, and the checks that the mesh survived it."""

from __future__ import annotations

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.inference.v1 import inference_service_pb2_grpc as inference_grpc
from tests.fuzz.conftest import FuzzMesh

# Codes that tell the caller to change the request (or wait for its own quota), never the server;
# UNIMPLEMENTED for a method this server does not serve (Triton's statistics on the router).
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
# How gRPC words its refusals of oversized messages and headers.
GRPC_SIZE_LIMITS = ("larger than max", "metadata size exceeds")
GRPC_SERVICES = ("registry", "orchestrator", "router", "batch", "batch_worker")


def assert_client_error(error: grpc.RpcError) -> None:
    """A client-error code, with google.rpc details naming the reason.

    The one exception is a message or headers over gRPC's size limits: gRPC itself refuses
    them before any tensorway code runs, with RESOURCE_EXHAUSTED and no details to carry.
    """
    assert isinstance(error, grpc.Call)
    code = error.code()
    assert code in CLIENT_ERRORS, f"{code.name}: {error.details()}"
    status = rpc_status.from_call(error)
    if status is None:
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, f"{code.name} without details: {error.details()}"
        assert any(limit in (error.details() or "") for limit in GRPC_SIZE_LIMITS), error.details()
        return
    infos = [detail for detail in status.details if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert infos, f"{code.name} without ErrorInfo: {status}"


def good_infer_request() -> inference_pb.InferRequest:
    """A request `simple` answers: INPUT0 = 0..15, INPUT1 = 1."""
    first = np.arange(16, dtype=np.int32).reshape(1, 16)
    return inference_pb.InferRequest(
        model_name="simple",
        inputs=[
            tensor_pb2.Tensor(name="INPUT0", datatype="INT32", shape=[1, 16], raw_contents=first.tobytes()),
            tensor_pb2.Tensor(
                name="INPUT1", datatype="INT32", shape=[1, 16], raw_contents=np.ones_like(first).tobytes()
            ),
        ],
    )


def assert_mesh_serves(mesh: FuzzMesh) -> None:
    """Every service process runs and says SERVING, and a good request still gets its answer."""
    assert not mesh.dead_processes(), f"crashed: {mesh.dead_processes()}"
    for service in GRPC_SERVICES:
        with mesh.channel(service) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with mesh.channel("router") as channel:
        answer = inference_grpc.InferenceServiceStub(channel).Infer(good_infer_request(), timeout=10)
    sums = next(output for output in answer.outputs if output.name == "OUTPUT0")
    values = (
        np.frombuffer(sums.raw_contents, dtype=np.int32).tolist()
        if sums.raw_contents
        else list(sums.contents.int_contents)
    )
    assert values == list(range(1, 17))
