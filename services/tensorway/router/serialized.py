"""Requests as the router forwards them: the caller's serialized bytes, read only where routing
must look, so tensors are never parsed or serialized again on their way through."""

from __future__ import annotations

from dataclasses import dataclass

from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.runtime import FieldViolation, InvalidArgument
from tensorway.tensors import wire
from tensorway.tensors.triton import SequenceStep, sequence_step

_MODEL_NAME = pb.InferRequest.MODEL_NAME_FIELD_NUMBER
_MODEL_VERSION = pb.InferRequest.MODEL_VERSION_FIELD_NUMBER


@dataclass(frozen=True, slots=True)
class SerializedRequest:
    """An InferRequest as serialized bytes, with the two fields routing needs read off the wire."""

    data: bytes
    model: str
    version: str
    sequence: SequenceStep | None = None
    """The stateful sequence the request belongs to, where it was read: a parsed request's
    parameters give it; `parse` reads no parameters off the wire, so unary tensorway Infer calls
    are routed as requests of no sequence."""

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
    def of(cls, request: pb.InferRequest) -> SerializedRequest:
        return cls(
            request.SerializeToString(),
            request.model_name,
            request.model_version,
            sequence_step(request.parameters),
        )

    def for_version(self, version: str) -> bytes:
        """The request for `version`: the same bytes when it names it already, else with the
        version appended, which a parser takes over the earlier one (the last value wins)."""
        if version == self.version:
            return self.data
        return self.data + wire.string_field(_MODEL_VERSION, version)
