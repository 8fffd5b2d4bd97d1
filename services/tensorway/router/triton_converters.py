"""Triton's requests in, tensorway's out, and back: the inverse of the orchestrator's converters.

The orchestrator turns tensorway requests into Triton's and Triton's answers into tensorway's;
the router, facing Triton clients, needs the other two directions. Raw bytes move as bytes (each
buffer is referenced, never walked element by element), and the per-datatype packing and the
parameter mapping come from the orchestrator's converters so they exist once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.orchestrator.converters import _copy_parameters, _parameter_from_triton, pack_contents


def from_triton_request(request: Any, default_outputs: Iterable[tensor_pb2.TensorSpec]) -> pb.InferRequest:
    """The tensorway InferRequest for a Triton ModelInferRequest.

    Outputs always come back raw, since Triton's gRPC clients read only raw output buffers; a
    request that names no outputs asks for all of them, `default_outputs` (the signature's).
    """
    converted = pb.InferRequest(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    for key, value in request.parameters.items():
        converted.parameters[key].CopyFrom(_parameter_from_triton(value))
    raw_inputs = request.raw_input_contents
    for index, tensor in enumerate(request.inputs):
        entry = converted.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for key, value in tensor.parameters.items():
            entry.parameters[key].CopyFrom(_parameter_from_triton(value))
        if raw_inputs:
            entry.raw_contents = raw_inputs[index] if index < len(raw_inputs) else b""
        else:
            # Triton's InferTensorContents and tensorway's TensorContents share field numbers and
            # types, so the typed values cross as one serialized buffer instead of field by field.
            entry.contents.MergeFromString(tensor.contents.SerializeToString())
    for output in request.outputs:
        wanted = converted.outputs.add(name=output.name, binary=True)
        for key, value in output.parameters.items():
            wanted.parameters[key].CopyFrom(_parameter_from_triton(value))
    if not request.outputs:
        converted.outputs.extend(pb.RequestedOutput(name=spec.name, binary=True) for spec in default_outputs)
    return converted


def to_triton_response(response: pb.InferResponse, request_id: str) -> Any:
    """The Triton ModelInferResponse for a tensorway InferResponse: every output in raw bytes."""
    converted = triton.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=request_id
    )
    _copy_parameters(response.parameters, converted.parameters)
    for tensor in response.outputs:
        output = converted.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        _copy_parameters(tensor.parameters, output.parameters)
        converted.raw_output_contents.append(
            tensor.raw_contents if tensor.raw_contents else pack_contents(tensor.datatype, tensor.contents)
        )
    return converted
