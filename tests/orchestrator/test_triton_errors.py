"""Triton's own refusals in the mesh's words: each BYTES, shape and datatype mistake sent to the real
Triton (2.51), unary and on a stream, is recognised as the client's and described without backend
text or request ids; the same mistakes through the orchestrator are INVALID_ARGUMENT."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service

from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.orchestrator.triton_errors import ModelGone, from_rpc_error, from_stream_error
from tensorway.runtime import Internal, InvalidArgument
from tensorway.tensors.triton import from_triton_request

from .test_validation import details

CLIENT_ID = "client-id-7"


def pack(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


DECIMALS = pack([str(i).encode() for i in range(16)])


def pair(
    raw0: bytes, raw1: bytes = DECIMALS, shape: tuple[int, ...] = (1, 16), datatype: str = "BYTES"
) -> Any:
    request = triton.ModelInferRequest(model_name="simple_string", id=CLIENT_ID)
    request.inputs.add(name="INPUT0", datatype=datatype, shape=list(shape))
    request.inputs.add(name="INPUT1", datatype=datatype, shape=list(shape))
    request.raw_input_contents.extend([raw0, raw1])
    return request


def renamed(request: Any, name: str) -> Any:
    request.inputs[1].name = name
    return request


def without_second_input(request: Any) -> Any:
    del request.inputs[1]
    del request.raw_input_contents[1]
    return request


def with_output(request: Any, name: str) -> Any:
    request.outputs.add(name=name)
    return request


# Each mistake and the description the mesh gives it: Triton finds them all itself (the model
# raises on the last two), so its wording is what is recognised here.
MISTAKES: dict[str, tuple[Any, str]] = {
    "too-few-elements": (
        pair(pack([b"1"] * 15)),
        "input 'INPUT0' holds 15 BYTES elements, but its shape holds 16",
    ),
    "too-many-elements": (
        pair(pack([b"1"] * 17)),
        "input 'INPUT0' holds 17 BYTES elements, but its shape holds 16",
    ),
    "cut-length-prefix": (
        pair(DECIMALS + b"\x01\x00"),
        "input 'INPUT0': a BYTES element's 4-byte length prefix is cut short",
    ),
    "length-past-the-end": (
        pair(pack([b"1"] * 15) + struct.pack("<I", 50) + b"1"),
        "input 'INPUT0': a BYTES element's length prefix says 50 bytes, past the end of the tensor",
    ),
    "wrong-shape": (
        pair(pack([b"1"] * 15), pack([b"1"] * 15), shape=(1, 15)),
        "input 'INPUT1': shape [1, 15] does not match [-1, 16]",
    ),
    "wrong-datatype": (
        pair(b"\0" * 64, b"\0" * 64, datatype="INT32"),
        "input 'INPUT1' must be BYTES, not INT32",
    ),
    "over-max-batch": (
        pair(pack([b"1"] * 144), pack([b"1"] * 144), shape=(9, 16)),
        "the batch size is over the model's maximum of 8",
    ),
    "unknown-input": (renamed(pair(DECIMALS), "INPUT9"), "the model has no input 'INPUT9'"),
    "missing-input": (without_second_input(pair(DECIMALS)), "the model takes 2 inputs, the request has 1"),
    "unknown-output": (with_output(pair(DECIMALS), "OUTPUT9"), "the model has no output 'OUTPUT9'"),
    "not-decimal": (
        pair(pack([b"abc"] * 16)),
        "input 'INPUT0' must hold decimal integers, one per BYTES element",
    ),
    "out-of-range": (pair(pack([b"99999999999"] * 16)), "input 'INPUT0' holds a value outside int32"),
}


# The orchestrator's own checks catch the rest before Triton sees them, in its own words.
MODEL_REFUSALS = ("not-decimal", "out-of-range")


@pytest.fixture(scope="module")
async def triton_direct(triton_grpc: str) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(triton_grpc) as channel:
        stub = triton_service.GRPCInferenceServiceStub(channel)
        await stub.RepositoryModelLoad(triton.RepositoryModelLoadRequest(model_name="simple_string"))
        yield stub


def assert_ours(error: Exception, description: str) -> None:
    assert isinstance(error, InvalidArgument)
    assert error.message == f"request does not fit model 'simple_string': {description}"
    assert [(violation.field, violation.description) for violation in error.violations] in (
        [("inputs", description)],
        [("outputs", description)],
    )


async def test_triton_refusals_unary_and_on_a_stream_are_the_clients_in_our_words(triton_direct: Any) -> None:
    stream = triton_direct.ModelStreamInfer()
    try:
        for case, (request, description) in MISTAKES.items():
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await triton_direct.ModelInfer(request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
            assert_ours(from_rpc_error(raised.value, "simple_string"), description)

            await stream.write(request)
            answer = await stream.read()
            assert answer.error_message, case
            assert_ours(from_stream_error(answer.error_message, "simple_string"), description)
    finally:
        await stream.done_writing()
        stream.cancel()


@pytest.mark.parametrize("case", MISTAKES)
async def test_through_the_orchestrator_each_is_invalid_with_no_backend_text(
    stub: pb_grpc.InferenceServiceStub, case: str
) -> None:
    request, description = MISTAKES[case]
    converted = from_triton_request(request, [])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Infer(converted)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = raised.value.details() or ""
    assert message.startswith("request does not fit model 'simple_string': ")
    assert "request id" not in message
    assert "for model" not in message
    if case in MODEL_REFUSALS:
        assert message.endswith(description)
    info, _ = details(raised.value)
    assert info.reason == "TENSOR_INVALID"


@pytest.mark.parametrize("case", MISTAKES)
async def test_through_tritons_api_on_the_orchestrator_each_is_invalid_in_the_same_words(
    orchestrator: str, case: str
) -> None:
    request, description = MISTAKES[case]
    async with grpc.aio.insecure_channel(orchestrator) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await triton_service.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = raised.value.details() or ""
    assert message.startswith("request does not fit model 'simple_string': ")
    assert "request id" not in message
    if case in MODEL_REFUSALS:
        assert message.endswith(description)


async def test_a_good_request_still_runs(stub: pb_grpc.InferenceServiceStub) -> None:
    response = await stub.Infer(from_triton_request(pair(DECIMALS), []))
    assert [output.name for output in response.outputs] == ["OUTPUT0", "OUTPUT1"]


@pytest.mark.parametrize(
    ("message", "expected", "shown"),
    [
        (
            "Failed to process the request(s) for model instance 'm_0_0', message: "
            "Stub process 'm_0_0' is not healthy.",
            ModelGone,
            "Failed to process the request(s) for model instance 'm_0_0', message: "
            "Stub process 'm_0_0' is not healthy.",
        ),
        ("[request id: 41] inference failed: out of memory", Internal, "inference failed: out of memory"),
    ],
    ids=["stub-died", "model-failed"],
)
def test_server_faults_stay_server_faults_without_our_request_ids(
    message: str, expected: type[Exception], shown: str
) -> None:
    error = from_stream_error(message, "m")
    assert type(error) is expected
    assert error.message == shown  # type: ignore[attr-defined]


def test_a_models_own_invalid_argument_on_a_unary_call_is_the_clients() -> None:
    error = from_rpc_error(
        grpc.aio.AioRpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "[request id: 9] text must be ASCII",
        ),
        "m",
    )
    assert isinstance(error, InvalidArgument)
    assert error.message == "text must be ASCII"
