"""Tensor conversion for every datatype, and every branch of the Triton error mapping."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.orchestrator.triton_errors import ModelGone, from_rpc_error, from_stream_error
from tensorway.runtime import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, Unavailable
from tensorway.tensors.layouts import (
    CONTENTS_FIELDS,
    FIXED_SIZE_DTYPES,
    pack_bytes,
    pack_contents,
    unpack_bytes,
    unpack_contents,
)
from tensorway.tensors.triton import from_triton_response, raw_inputs, to_triton_request

VALUES = {
    "BOOL": [True, False, True],
    "UINT8": [0, 7, 255],
    "UINT16": [0, 7, 65535],
    "UINT32": [0, 7, 2**32 - 1],
    "UINT64": [0, 7, 2**64 - 1],
    "INT8": [-128, 0, 127],
    "INT16": [-32768, 0, 32767],
    "INT32": [-(2**31), 0, 2**31 - 1],
    "INT64": [-(2**63), 0, 2**63 - 1],
    "FP16": [-1.5, 0.0, 65504.0],
    "FP32": [-1.5, 0.25, 2.0**100],
    "FP64": [-1.5, 0.1, 1.0e300],
    "BF16": [-1.5, 0.0, 256.0],
}


@pytest.mark.parametrize("datatype", VALUES)
def test_typed_contents_pack_to_triton_layout_and_back(datatype: str) -> None:
    contents = tensor_pb2.TensorContents(**{CONTENTS_FIELDS[datatype]: VALUES[datatype]})
    raw = pack_contents(datatype, contents)
    if datatype != "BF16":
        expected = np.array(VALUES[datatype], dtype=FIXED_SIZE_DTYPES[datatype]).tobytes()
        assert raw == expected
    unpacked = tensor_pb2.TensorContents()
    unpack_contents(datatype, raw, unpacked)
    assert list(getattr(unpacked, CONTENTS_FIELDS[datatype])) == VALUES[datatype]


def test_bf16_rounds_to_nearest_even() -> None:
    # 1 + 2**-8 lies halfway between two BF16 values: it goes to the even one, 1.0.
    contents = tensor_pb2.TensorContents(fp32_contents=[1 + 2**-8, 1 + 3 * 2**-8])
    assert np.frombuffer(pack_contents("BF16", contents), dtype="<u2").tolist() == [0x3F80, 0x3F82]


def test_bytes_use_length_prefixes() -> None:
    items = [b"", b"abc", bytes(range(256))]
    raw = pack_bytes(items)
    assert raw[:4] == b"\x00\x00\x00\x00"
    assert raw[4:11] == b"\x03\x00\x00\x00abc"
    assert unpack_bytes(raw) == items
    assert pack_contents("BYTES", tensor_pb2.TensorContents(bytes_contents=items)) == raw


def test_request_goes_out_raw_and_the_answer_comes_back_as_asked() -> None:
    request = pb.InferRequest(
        model_name="m",
        model_version="2",
        id="caller-id",
        inputs=[
            tensor_pb2.Tensor(name="a", datatype="INT32", shape=[2], raw_contents=b"\x01\x00\x00\x00" * 2),
            tensor_pb2.Tensor(
                name="b", datatype="FP32", shape=[1], contents=tensor_pb2.TensorContents(fp32_contents=[0.5])
            ),
        ],
        outputs=[pb.RequestedOutput(name="x", binary=True), pb.RequestedOutput(name="y")],
        parameters={
            "priority": tensor_pb2.Parameter(int64_value=2),
            "tag": tensor_pb2.Parameter(string_value="t"),
        },
    )
    converted = to_triton_request(request, raw_inputs(request))
    assert (converted.model_name, converted.model_version, converted.id) == ("m", "2", "caller-id")
    assert list(converted.raw_input_contents) == [b"\x01\x00\x00\x00" * 2, np.float32(0.5).tobytes()]
    assert converted.parameters["priority"].int64_param == 2
    assert converted.parameters["tag"].string_param == "t"
    assert [o.name for o in converted.outputs] == ["x", "y"]

    answer = triton.ModelInferResponse(model_name="m", model_version="2", id="7")
    answer.outputs.add(name="x", datatype="INT64", shape=[1])
    answer.outputs.add(name="y", datatype="INT64", shape=[1])
    answer.raw_output_contents.extend([np.int64(5).tobytes(), np.int64(6).tobytes()])
    answer.parameters["sequence"].bool_param = True
    response = from_triton_response(answer, request)
    assert response.id == "caller-id"
    assert response.outputs[0].raw_contents == np.int64(5).tobytes()
    assert list(response.outputs[1].contents.int64_contents) == [6]
    assert response.parameters["sequence"].bool_value


@pytest.mark.parametrize(
    ("message", "expected", "shown"),
    [
        (
            "Request for unknown model: 'iris' has no available versions",
            ModelGone,
            "Request for unknown model: 'iris' has no available versions",
        ),
        (
            "[request id: 3] unexpected shape for input 'x' for model 'm'. Expected [-1,4], got [1,5].",
            InvalidArgument,
            "request does not fit model 'm': input 'x': shape [1, 5] does not match [-1, 4]",
        ),
        (
            "[request id: 3] inference input 'x' data-type is 'FP32', but model 'm' expects 'INT32'",
            InvalidArgument,
            "request does not fit model 'm': input 'x' must be INT32, not FP32",
        ),
        (
            "INPUT0 must hold decimal integers: invalid literal for int() with base 10: b'abc'",
            InvalidArgument,
            "request does not fit model 'm': "
            "input 'INPUT0' must hold decimal integers, one per BYTES element",
        ),
        ("[request id: 3] the model broke", Internal, "the model broke"),
    ],
    ids=["model-gone", "shape", "datatype", "model-refused", "model-error"],
)
def test_stream_errors_by_message(message: str, expected: type[Exception], shown: str) -> None:
    error = from_stream_error(message, "m")
    assert type(error) is expected
    assert error.message == shown
    assert error.metadata == {"model": "m"}


@pytest.mark.parametrize(
    ("code", "expected", "reason"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument, "TENSOR_INVALID"),
        (grpc.StatusCode.NOT_FOUND, ModelGone, "MODEL_NOT_READY"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, "DEADLINE_EXCEEDED"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted, "RESOURCE_EXHAUSTED"),
        (grpc.StatusCode.UNAVAILABLE, Unavailable, "UNAVAILABLE"),
        (grpc.StatusCode.CANCELLED, Unavailable, "UNAVAILABLE"),
        (grpc.StatusCode.INTERNAL, Internal, "BACKEND_ERROR"),
        (grpc.StatusCode.UNKNOWN, Internal, "BACKEND_ERROR"),
    ],
)
def test_unary_errors_by_status_code(code: grpc.StatusCode, expected: type[Exception], reason: str) -> None:
    error = from_rpc_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "why"), "m")
    assert type(error) is expected
    assert error.to_status_proto().details[0].value.startswith(b"\n" + bytes([len(reason)]) + reason.encode())
