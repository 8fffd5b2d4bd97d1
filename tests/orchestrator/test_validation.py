"""Requests that misfit their model are refused before Triton sees them; unknown models are NOT_FOUND."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.orchestrator.validation import validate_request
from tensorway.runtime import InvalidArgument
from tensorway.tensors.layouts import pack_bytes
from tensorway.tensors.signatures import ModelSignature, TensorSpec
from tensorway.tensors.triton import raw_inputs

from .conftest import StartOrchestrator, TcpProxy


def int32(
    name: str, shape: list[int], *, count: int | None = None, datatype: str = "INT32"
) -> tensor_pb2.Tensor:
    values = np.zeros(int(np.prod(shape)) if count is None else count, dtype=np.int32)
    return tensor_pb2.Tensor(name=name, datatype=datatype, shape=shape, raw_contents=values.tobytes())


async def quiet_upstream(proxy: TcpProxy) -> int:
    """The proxy's upstream byte count once the start-up polls and HTTP/2 housekeeping are over."""
    while True:
        before = proxy.upstream_bytes
        await asyncio.sleep(0.2)
        if proxy.upstream_bytes == before:
            return before


def details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[tuple[str, str]]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad_request.DESCRIPTOR):
            detail.Unpack(bad_request)
    return info, [(v.field, v.description) for v in bad_request.field_violations]


SIMPLE_MISFITS = {
    "wrong-shape": (
        [int32("INPUT0", [1, 15]), int32("INPUT1", [1, 16])],
        [("inputs[0].shape", "input 'INPUT0': shape [1, 15] does not match [-1, 16]")],
    ),
    "wrong-datatype": (
        [int32("INPUT0", [1, 16]), int32("INPUT1", [1, 16], datatype="FP32")],
        [("inputs[1].datatype", "input 'INPUT1' must be INT32, not FP32")],
    ),
    "unknown-input": (
        [int32("INPUT0", [1, 16]), int32("INPUT1", [1, 16]), int32("INPUT2", [1, 16])],
        [("inputs[2].name", "simple has no input 'INPUT2'; it has INPUT0, INPUT1")],
    ),
    "missing-input": ([int32("INPUT0", [1, 16])], [("inputs", "input 'INPUT1' is missing")]),
    "over-max-batch": (
        [int32("INPUT0", [9, 16]), int32("INPUT1", [9, 16])],
        [
            ("inputs[0].shape", "input 'INPUT0': batch size 9 is outside 1..8"),
            ("inputs[1].shape", "input 'INPUT1': batch size 9 is outside 1..8"),
        ],
    ),
    "short-raw-bytes": (
        [int32("INPUT0", [2, 16], count=31), int32("INPUT1", [2, 16])],
        [("inputs[0].raw_contents", "input 'INPUT0': 124 bytes, but 32 INT32 elements take 128")],
    ),
}


@pytest.mark.parametrize("case", SIMPLE_MISFITS)
async def test_misfit_is_refused_naming_the_tensor_and_never_reaches_triton(
    start_orchestrator: StartOrchestrator,
    triton_proxy: TcpProxy,
    inference_count: Callable[[str], Awaitable[int]],
    case: str,
) -> None:
    inputs, violations = SIMPLE_MISFITS[case]
    # No readiness polls during the test: only requests would travel to Triton.
    address = await start_orchestrator(triton_proxy.address, health_interval=timedelta(hours=1))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        # The signature is fetched and the streams opened by a good request first.
        await stub.Infer(
            pb.InferRequest(model_name="simple", inputs=[int32("INPUT0", [1, 16]), int32("INPUT1", [1, 16])])
        )
        bytes_to_triton = await quiet_upstream(triton_proxy)
        triton_runs = await inference_count("simple")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Infer(pb.InferRequest(model_name="simple", inputs=inputs))
        assert await inference_count("simple") == triton_runs
        assert triton_proxy.upstream_bytes == bytes_to_triton
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, got = details(raised.value)
    assert info.reason == "TENSOR_INVALID"
    assert info.metadata["model"] == "simple"
    assert got == violations
    assert violations[0][1] in (raised.value.details() or "")


async def test_unknown_model_is_not_found(stub: pb_grpc.InferenceServiceStub) -> None:
    for call in (
        stub.Infer(pb.InferRequest(model_name="no_such_model")),
        stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="no_such_model")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert details(raised.value)[0].reason == "MODEL_NOT_FOUND"


async def test_unknown_version_is_not_found(stub: pb_grpc.InferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="simple", model_version="7"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "simple/7" in (raised.value.details() or "")


async def test_unknown_output_is_refused(stub: pb_grpc.InferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Infer(
            pb.InferRequest(
                model_name="simple",
                inputs=[int32("INPUT0", [1, 16]), int32("INPUT1", [1, 16])],
                outputs=[pb.RequestedOutput(name="OUTPUT9")],
            )
        )
    assert details(raised.value)[1] == [
        ("outputs[0].name", "simple has no output 'OUTPUT9'; it has OUTPUT0, OUTPUT1")
    ]


# Signature checks that need no Triton: a model with a dynamic dim, BYTES and an optional input.
SIGNATURE = ModelSignature(
    name="m",
    versions=("1",),
    platform="python",
    max_batch_size=4,
    inputs=(
        TensorSpec("x", "FP32", (-1, 3)),
        TensorSpec("s", "BYTES", (1,)),
        TensorSpec("o", "BF16", (2,), optional=True),
    ),
    outputs=(TensorSpec("y", "FP32", (3,)),),
)


def fp32(shape: list[int], values: list[float] | None = None, **contents: Any) -> tensor_pb2.Tensor:
    count = int(np.prod(shape))
    typed = tensor_pb2.TensorContents(fp32_contents=[0.0] * count if values is None else values, **contents)
    return tensor_pb2.Tensor(name="x", datatype="FP32", shape=shape, contents=typed)


def strings(shape: list[int], raw: bytes | None = None) -> tensor_pb2.Tensor:
    if raw is not None:
        return tensor_pb2.Tensor(name="s", datatype="BYTES", shape=shape, raw_contents=raw)
    count = int(np.prod(shape))
    return tensor_pb2.Tensor(
        name="s",
        datatype="BYTES",
        shape=shape,
        contents=tensor_pb2.TensorContents(bytes_contents=[b"a"] * count),
    )


def violations_of(*inputs: tensor_pb2.Tensor) -> list[tuple[str, str]]:
    try:
        request = pb.InferRequest(model_name="m", inputs=inputs)
        validate_request(request, SIGNATURE, raw_inputs(request))
    except InvalidArgument as error:
        return [(v.field, v.description) for v in error.violations]
    return []


def test_dynamic_dims_take_any_size_and_optional_inputs_may_be_left_out() -> None:
    assert violations_of(fp32([2, 7, 3]), strings([2, 1])) == []
    assert violations_of(fp32([1, 0, 3]), strings([1, 1])) == []


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (
            (fp32([2, 1, 3], [0.0] * 5), strings([2, 1])),
            [("inputs[0].contents", "input 'x': 5 values in contents.fp32_contents, but the shape holds 6")],
        ),
        (
            (fp32([1, 1, 3], [], int_contents=[1, 2, 3]), strings([1, 1])),
            [("inputs[0].contents", "input 'x': FP32 goes in contents.fp32_contents, not int_contents")],
        ),
        (
            (fp32([1, 1, 3]), strings([1, 1], raw=b"\x00" * 3)),
            [("inputs[1].raw_contents", "input 's': 3 bytes cannot hold 1 BYTES elements")],
        ),
        (
            (fp32([2, 1, 3]), strings([2, 1], raw=pack_bytes([b"abcdefgh"]))),
            [("inputs[1].raw_contents", "input 's': holds 1 BYTES elements, but its shape holds 2")],
        ),
        (
            (fp32([2, 1, 3]), strings([2, 1], raw=pack_bytes([b"ab"]) + b"\x09\x00\x00\x00abc")),
            [
                (
                    "inputs[1].raw_contents",
                    "input 's': BYTES element 1's length prefix says 9 bytes, past the end of the tensor",
                )
            ],
        ),
        (
            (fp32([1, 1, 3]), strings([1, 1], raw=pack_bytes([b"ab"]) + b"\x00")),
            [("inputs[1].raw_contents", "input 's': 1 bytes follow the last of its 1 BYTES elements")],
        ),
        (
            (fp32([2, 1, 3]), strings([3, 1])),
            [("inputs", "inputs disagree on the batch size (x: 2, s: 3)")],
        ),
        (
            (fp32([1, 1, 3]), strings([1, 1]), strings([1, 1])),
            [("inputs[2].name", "input 's' is given twice")],
        ),
        (
            (fp32([1, -1, 3]), strings([1, 1])),
            [("inputs[0].shape", "input 'x': shape [1, -1, 3] does not match [-1, -1, 3]")],
        ),
        (
            (fp32([0, 1, 3]), strings([0, 1])),
            [
                ("inputs[0].shape", "input 'x': batch size 0 is outside 1..4"),
                ("inputs[1].shape", "input 's': batch size 0 is outside 1..4"),
            ],
        ),
    ],
    ids=[
        "value-count",
        "wrong-contents-field",
        "raw-bytes-too-short",
        "too-few-bytes-elements",
        "length-past-the-end",
        "bytes-after-the-last-element",
        "batch-disagreement",
        "duplicate",
        "negative-dim",
        "empty-batch",
    ],
)
def test_signature_misfits(inputs: tuple[tensor_pb2.Tensor, ...], expected: list[tuple[str, str]]) -> None:
    assert violations_of(*inputs) == expected


def test_raw_and_typed_contents_together_are_refused() -> None:
    both = fp32([1, 1, 3])
    both.raw_contents = np.zeros(3, dtype=np.float32).tobytes()
    assert violations_of(both, strings([1, 1])) == [
        ("inputs[0].contents", "input 'x': set contents or raw_contents, not both")
    ]
