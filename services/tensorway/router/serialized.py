"""Requests as the router forwards them: the caller's serialized bytes, read only where routing
must look, so tensors are never parsed or serialized again on their way through.

Both public APIs' request messages (tensorway's InferRequest and Triton's ModelInferRequest) carry
the model name and version as fields 1 and 2, so one reading of the wire routes either; each is
forwarded to the orchestrator method that takes the same message (`WireApi`).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as triton

from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.runtime import FieldViolation, InvalidArgument
from tensorway.tensors import wire
from tensorway.tensors.triton import SequenceStep, sequence_step, triton_sequence_step

# The same numbers in Triton's ModelInferRequest (tests/router/test_serialized.py holds them to it).
_MODEL_NAME = pb.InferRequest.MODEL_NAME_FIELD_NUMBER
_MODEL_VERSION = pb.InferRequest.MODEL_VERSION_FIELD_NUMBER
# What routing reads of a Triton request: its names, its id (a stream's error answer echoes it)
# and its parameters (a stateful sequence's id, start and end).
_TRITON_HEAD = (
    _MODEL_NAME,
    _MODEL_VERSION,
    triton.ModelInferRequest.ID_FIELD_NUMBER,
    triton.ModelInferRequest.PARAMETERS_FIELD_NUMBER,
)


@dataclass(frozen=True, slots=True)
class WireApi:
    """One of the two inference APIs as it crosses the router: the orchestrator's method that
    takes its request message, and where that message keeps its input tensors (the global
    limits count rows from their shapes, field 3 of a tensor in both APIs)."""

    name: str
    method: str
    inputs_field: int


TENSORWAY = WireApi(
    "tensorway", "/tensorway.inference.v1.InferenceService/Infer", pb.InferRequest.INPUTS_FIELD_NUMBER
)
TRITON = WireApi(
    "triton", "/inference.GRPCInferenceService/ModelInfer", triton.ModelInferRequest.INPUTS_FIELD_NUMBER
)


@dataclass(frozen=True, slots=True)
class SerializedRequest:
    """A request as serialized bytes, with the fields routing needs read off the wire."""

    data: bytes
    model: str
    version: str
    sequence: SequenceStep | None = None
    """The stateful sequence the request belongs to, where it was read: a parsed request's
    parameters give it, and a Triton request's are read off the wire; `parse` reads no parameters,
    so unary tensorway Infer calls are routed as requests of no sequence."""
    api: WireApi = TENSORWAY
    id: str = ""
    """The caller's request id, where it was read (Triton requests)."""

    @classmethod
    def parse(cls, data: bytes) -> SerializedRequest:
        """Read the model and version of a serialized InferRequest; INVALID_ARGUMENT if it is none."""
        try:
            fields = wire.read_strings(data, (_MODEL_NAME, _MODEL_VERSION))
            return cls(data, fields.get(_MODEL_NAME, b"").decode(), fields.get(_MODEL_VERSION, b"").decode())
        except (wire.MalformedMessage, UnicodeDecodeError) as error:
            raise InvalidArgument(
                "the request is not a serialized InferRequest",
                [FieldViolation("request", str(error))],
            ) from error

    @classmethod
    def parse_triton(cls, data: bytes) -> SerializedRequest:
        """Read the model, version, id and sequence of a serialized Triton ModelInferRequest: its
        short fields are parsed on their own, its tensors are jumped over. INVALID_ARGUMENT if the
        bytes are no such message."""
        try:
            head = triton.ModelInferRequest.FromString(wire.select(data, _TRITON_HEAD))
        except (wire.MalformedMessage, DecodeError) as error:
            raise InvalidArgument(
                "the request is not a serialized ModelInferRequest",
                [FieldViolation("request", str(error))],
            ) from error
        return cls(
            data,
            head.model_name,
            head.model_version,
            triton_sequence_step(head.parameters),
            TRITON,
            head.id,
        )

    @classmethod
    def of(cls, request: pb.InferRequest) -> SerializedRequest:
        return cls(
            request.SerializeToString(),
            request.model_name,
            request.model_version,
            sequence_step(request.parameters),
        )

    def with_version(self, version: str) -> SerializedRequest:
        """The same request naming `version` (appended to its bytes when it names another)."""
        if version == self.version:
            return self
        return SerializedRequest(
            self.for_version(version), self.model, version, self.sequence, self.api, self.id
        )

    def for_version(self, version: str) -> bytes:
        """The request for `version`: the same bytes when it names it already, else with the
        version appended, which a parser takes over the earlier one (the last value wins)."""
        if version == self.version:
            return self.data
        return self.data + wire.string_field(_MODEL_VERSION, version)
