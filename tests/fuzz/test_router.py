"""The router's public gRPC surface, tensorway's InferenceService and Triton's
GRPCInferenceService, fed malformed and extreme messages: every one is answered or refused with a
client error, and the router, orchestrator and Triton behind it keep serving."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as triton

from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.runtime.errors import GENERIC_INTERNAL_MESSAGE
from tests.fuzz.budget import fuzz_budget
from tests.fuzz.calls import assert_stream_error_is_clients, call, call_raw
from tests.fuzz.conftest import FuzzMesh
from tests.fuzz.outcomes import assert_mesh_serves
from tests.fuzz.strategies import (
    almost_right_requests,
    almost_right_triton_requests,
    messages,
    request_metadata,
    wire_garbage,
)

INFERENCE = inference_pb.DESCRIPTOR.services_by_name["InferenceService"]
TRITON = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
ROUTER_METHODS = [*INFERENCE.methods, *TRITON.methods]


@pytest.mark.parametrize("method", ROUTER_METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
@fuzz_budget(max_examples=20)
@given(data=st.data())
def test_any_message_to_any_router_rpc_gets_an_answer_or_a_client_error(
    fuzz_mesh: FuzzMesh, method: object, data: st.DataObject
) -> None:
    requests = data.draw(st.lists(messages(method.input_type), min_size=1, max_size=3))
    call(fuzz_mesh, "router", method, requests)


@pytest.mark.parametrize("method", ROUTER_METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
@fuzz_budget(max_examples=12)
@given(data=st.data())
def test_bytes_that_are_no_request_get_a_client_error(
    fuzz_mesh: FuzzMesh, method: object, data: st.DataObject
) -> None:
    call_raw(fuzz_mesh, "router", method, [data.draw(wire_garbage(method.input_type))])


@fuzz_budget(max_examples=300)
@given(request=almost_right_requests())
def test_almost_right_infer_requests_are_answered_or_refused(
    fuzz_mesh: FuzzMesh, request: inference_pb.InferRequest
) -> None:
    call(fuzz_mesh, "router", INFERENCE.methods_by_name["Infer"], [request])


@fuzz_budget(max_examples=60)
@given(requests=st.lists(almost_right_requests(), min_size=1, max_size=4))
def test_almost_right_requests_on_a_stream_get_answers_or_client_errors(
    fuzz_mesh: FuzzMesh, requests: list[inference_pb.InferRequest]
) -> None:
    items = [inference_pb.StreamInferRequest(request=request) for request in requests]
    for answer in call(fuzz_mesh, "router", INFERENCE.methods_by_name["StreamInfer"], items):
        reply = inference_pb.StreamInferResponse.FromString(answer)
        if reply.HasField("error"):
            assert_stream_error_is_clients(reply.error.code, reply.error.message)


def _with_unsigned_parameter(value: int) -> object:
    request = triton.ModelInferRequest(model_name="simple")
    request.parameters["priority"].uint64_param = value
    return request


@fuzz_budget(max_examples=200)
@given(request=almost_right_triton_requests())
# A uint64 parameter past int64 failed the conversion with INTERNAL.
@example(request=_with_unsigned_parameter(2**64 - 1))
def test_almost_right_triton_requests_are_answered_or_refused(fuzz_mesh: FuzzMesh, request: object) -> None:
    call(fuzz_mesh, "router", TRITON.methods_by_name["ModelInfer"], [request])


@fuzz_budget(max_examples=40)
@given(requests=st.lists(almost_right_triton_requests(), min_size=1, max_size=4))
def test_almost_right_triton_requests_on_a_stream_get_answers_or_error_messages(
    fuzz_mesh: FuzzMesh, requests: list[object]
) -> None:
    for answer in call(fuzz_mesh, "router", TRITON.methods_by_name["ModelStreamInfer"], requests):
        reply = triton.ModelStreamInferResponse.FromString(answer)
        assert reply.error_message != GENERIC_INTERNAL_MESSAGE


@fuzz_budget(max_examples=60)
@given(metadata=request_metadata(), request=almost_right_requests())
def test_odd_request_headers_are_tolerated(
    fuzz_mesh: FuzzMesh, metadata: list[tuple[str, str]], request: inference_pb.InferRequest
) -> None:
    call(fuzz_mesh, "router", INFERENCE.methods_by_name["Infer"], [request], metadata)
    call(
        fuzz_mesh,
        "router",
        TRITON.methods_by_name["ModelMetadata"],
        [triton.ModelMetadataRequest(name="iris")],
        metadata,
    )


def test_the_router_still_serves_after_the_fuzzing(fuzz_mesh: FuzzMesh) -> None:
    assert_mesh_serves(fuzz_mesh)
