"""Every demo model through the orchestrator, raw and typed, against Triton's own answers."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from tritonclient.grpc import service_pb2 as triton
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from tensorway.common.v1 import tensor_pb2
from tensorway.demo_models._datasets import digits_split, iris_split
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc

Array = npt.NDArray[Any]
DATATYPES = {np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32", np.dtype(np.object_): "BYTES"}


def raw_bytes(array: Array) -> bytes:
    if array.dtype == np.object_:
        return bytes(serialize_byte_tensor(array).item())
    return array.tobytes()


def tensor(name: str, array: Array, *, typed: bool) -> tensor_pb2.Tensor:
    datatype = DATATYPES[array.dtype]
    if not typed:
        return tensor_pb2.Tensor(
            name=name, datatype=datatype, shape=array.shape, raw_contents=raw_bytes(array)
        )
    field = {"INT32": "int_contents", "FP32": "fp32_contents", "BYTES": "bytes_contents"}[datatype]
    contents = tensor_pb2.TensorContents(**{field: array.ravel().tolist()})
    return tensor_pb2.Tensor(name=name, datatype=datatype, shape=array.shape, contents=contents)


def as_array(output: tensor_pb2.Tensor) -> Array:
    """An output tensor's values, decoded independently of the orchestrator's converters."""
    if output.raw_contents:
        if output.datatype == "BYTES":
            return deserialize_bytes_tensor(output.raw_contents).reshape(output.shape)
        dtype = {"INT32": "<i4", "INT64": "<i8", "FP32": "<f4"}[output.datatype]
        return np.frombuffer(output.raw_contents, dtype=dtype).reshape(output.shape)
    values = {
        "INT32": output.contents.int_contents,
        "INT64": output.contents.int64_contents,
        "FP32": output.contents.fp32_contents,
        "BYTES": output.contents.bytes_contents,
    }[output.datatype]
    dtype = np.object_ if output.datatype == "BYTES" else None
    return np.array(list(values), dtype=dtype).reshape(output.shape)


async def triton_direct(triton_stub: Any, model: str, inputs: dict[str, Array]) -> dict[str, Array]:
    """Triton's own answer, over its own API with raw tensors."""
    request = triton.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=DATATYPES[array.dtype], shape=array.shape)
        request.raw_input_contents.append(raw_bytes(array))
    response = await triton_stub.ModelInfer(request)
    return {
        output.name: as_array(
            tensor_pb2.Tensor(
                name=output.name, datatype=output.datatype, shape=output.shape, raw_contents=raw
            )
        )
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def operands() -> tuple[Array, Array]:
    a = np.arange(48, dtype=np.int32).reshape(3, 16) - 20
    b = np.array([[1] * 16, [-7] * 16, [1000] * 16], dtype=np.int32)
    return a, b


def decimal(array: Array) -> Array:
    return np.array([str(v).encode() for v in array.ravel()], dtype=np.object_).reshape(array.shape)


CASES = {
    "simple": lambda: dict(zip(("INPUT0", "INPUT1"), operands(), strict=True)),
    "simple_string": lambda: dict(zip(("INPUT0", "INPUT1"), map(decimal, operands()), strict=True)),
    "digits": lambda: {"input": digits_split().x_test[:17]},
    "iris": lambda: {"input": iris_split().x_test[:9]},
}


@pytest.mark.parametrize("model", CASES)
@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
async def test_every_demo_model_answers_as_triton_does(
    stub: pb_grpc.InferenceServiceStub, triton_stub: Any, model: str, typed: bool
) -> None:
    inputs = CASES[model]()
    expected = await triton_direct(triton_stub, model, inputs)
    # Typed requests ask for typed outputs, raw requests for raw ones.
    response = await stub.Infer(
        pb.InferRequest(
            model_name=model,
            id=f"{model}-{typed}",
            inputs=[tensor(name, array, typed=typed) for name, array in inputs.items()],
            outputs=[pb.RequestedOutput(name=name, binary=not typed) for name in expected],
        )
    )
    assert response.id == f"{model}-{typed}"
    assert response.model_name == model
    assert response.model_version == "1"
    assert {output.name for output in response.outputs} == set(expected)
    for output in response.outputs:
        assert bool(output.raw_contents) is not typed
        got = as_array(output)
        assert got.shape == expected[output.name].shape
        np.testing.assert_array_equal(got, expected[output.name])


async def test_simple_adds_and_subtracts(stub: pb_grpc.InferenceServiceStub) -> None:
    a, b = operands()
    response = await stub.Infer(
        pb.InferRequest(
            model_name="simple", inputs=[tensor("INPUT0", a, typed=False), tensor("INPUT1", b, typed=True)]
        )
    )
    outputs = {output.name: as_array(output) for output in response.outputs}
    np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
    np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)


async def test_only_the_requested_outputs_come_back(stub: pb_grpc.InferenceServiceStub) -> None:
    response = await stub.Infer(
        pb.InferRequest(
            model_name="digits",
            inputs=[tensor("input", digits_split().x_test[:2], typed=False)],
            outputs=[pb.RequestedOutput(name="label", binary=True)],
        )
    )
    assert [output.name for output in response.outputs] == ["label"]
    assert as_array(response.outputs[0]).shape == (2, 1)


async def test_model_metadata_leaves_out_the_batch_dimension(stub: pb_grpc.InferenceServiceStub) -> None:
    metadata = await stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="digits"))
    assert metadata.name == "digits"
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "python"
    assert metadata.max_batch_size == 1024
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("label", "INT64", [1]),
        ("probabilities", "FP32", [10]),
    ]


async def test_a_models_refusal_of_bad_input_is_the_clients(stub: pb_grpc.InferenceServiceStub) -> None:
    words = decimal(np.zeros((1, 16), dtype=np.int32))
    words[0, 3] = b"three"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Infer(
            pb.InferRequest(
                model_name="simple_string",
                inputs=[tensor("INPUT0", words, typed=False), tensor("INPUT1", words, typed=True)],
            )
        )
    # On a stream Triton gives only the model's message, not its INVALID_ARG code: the generic
    # model.py's wording is recognised.
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == (
        "request does not fit model 'simple_string': "
        "input 'INPUT0' must hold decimal integers, one per BYTES element"
    )
