"""Triton's failures in the mesh's error model.

A unary call fails with a gRPC status whose code says what went wrong. A request failing on a
ModelStreamInfer stream carries only a message (the code is lost on the stream), so the
messages of Triton's own request checks are recognised by their wording (Triton 2.51's, checked
against a real Triton by tests/orchestrator/test_triton_errors.py).

Whose fault a failure is decides how the mesh treats it, and the router's breakers depend on it:

- Triton's request checks (shapes, datatypes, byte sizes, BYTES element counts and length
  prefixes, unknown or missing inputs) are the client's: INVALID_ARGUMENT with a message of the
  mesh's own naming the input, no backend text and no request id the client never sent.
- A Python-backend model says a request is at fault by answering it with
  `pb_utils.TritonError(message, TritonError.INVALID_ARG)`. A unary ModelInfer keeps that code;
  on a stream only the message survives, so the messages tensorway's generic model.py
  (demo_models/triton_model.py) gives for bad input are recognised as well.
- A model that cannot run on one Triton (its stub process died, the model was unloaded) is that
  Triton's fault: UNAVAILABLE, so the orchestrator runs the request on another Triton.
- Any other error a model answers with is BACKEND_ERROR (INTERNAL). Triton did answer, so the
  Triton is up; whether the model failed because of the request or by itself cannot be told from
  a message. Routers therefore never count BACKEND_ERROR against an endpoint: a model that fails
  every request fails on every endpoint alike, and ejecting an endpoint would take every other
  model of the pool down with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from tensorway.common.v1 import error_pb2
from tensorway.runtime import (
    Aborted,
    DeadlineExceeded,
    FieldViolation,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    TensorwayError,
    Unavailable,
)
from tensorway.tensors.triton import SequenceStep

# Triton puts the id it was given in front of many messages; the orchestrator's stream ids are
# not the client's, and the client's own id is in the answer already.
_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\] ")
_NAME = r"'(?P<input>[^']*)'"
_FOR_MODEL = r" for model '[^']*'"


@dataclass(frozen=True)
class _RequestCheck:
    """One of Triton's request checks: its message, and the mesh's words for it."""

    pattern: re.Pattern[str]
    field: str
    """The request field the violation names: "inputs" or "outputs"."""
    describe: Callable[[re.Match[str]], str]


def _check(pattern: str, field: str, describe: Callable[[re.Match[str]], str]) -> _RequestCheck:
    return _RequestCheck(re.compile(pattern), field, describe)


def _element_count(match: re.Match[str]) -> str:
    return (
        f"input {match['input']!r} holds {match['got']} BYTES elements, "
        f"but its shape holds {match['expected']}"
    )


_REQUEST_CHECKS = (
    _check(
        rf"expected (?P<expected>\d+) string elements for inference input {_NAME}{_FOR_MODEL}, "
        r"got (?P<got>\d+)",
        "inputs",
        _element_count,
    ),
    _check(
        rf"unexpected number of string elements (?P<got>\d+) for inference input {_NAME}{_FOR_MODEL}, "
        r"expecting (?P<expected>\d+)",
        "inputs",
        _element_count,
    ),
    _check(
        rf"incomplete string length indicator for inference input {_NAME}",
        "inputs",
        lambda m: f"input {m['input']!r}: a BYTES element's 4-byte length prefix is cut short",
    ),
    _check(
        rf"incomplete string data for inference input {_NAME}, expecting string of length (?P<length>\d+)",
        "inputs",
        lambda m: (
            f"input {m['input']!r}: a BYTES element's length prefix says {m['length']} bytes, "
            "past the end of the tensor"
        ),
    ),
    _check(
        rf"unexpected shape for input {_NAME}{_FOR_MODEL}\. Expected (?P<expected>\[[^\]]*\]), "
        r"got (?P<got>\[[^\]]*\])",
        "inputs",
        lambda m: f"input {m['input']!r}: shape {_spaced(m['got'])} does not match {_spaced(m['expected'])}",
    ),
    _check(
        rf"inference input {_NAME} data-type is '(?P<got>\w+)', "
        r"but model '[^']*' expects '(?P<expected>\w+)'",
        "inputs",
        lambda m: f"input {m['input']!r} must be {m['expected']}, not {m['got']}",
    ),
    _check(
        rf"input byte size mismatch for input {_NAME}{_FOR_MODEL}\. Expected (?P<expected>\d+), "
        r"got (?P<got>\d+)",
        "inputs",
        lambda m: f"input {m['input']!r}: {m['got']} bytes, but its shape takes {m['expected']}",
    ),
    _check(
        r"inference request batch-size must be <= (?P<max>\d+)",
        "inputs",
        lambda m: f"the batch size is over the model's maximum of {m['max']}",
    ),
    _check(
        rf"unexpected inference input {_NAME}",
        "inputs",
        lambda m: f"the model has no input {m['input']!r}",
    ),
    _check(
        r"expected (?P<expected>\d+) inputs but got (?P<got>\d+) inputs",
        "inputs",
        lambda m: f"the model takes {m['expected']} inputs, the request has {m['got']}",
    ),
    _check(
        r"unexpected inference output '(?P<input>[^']*)'",
        "outputs",
        lambda m: f"the model has no output {m['input']!r}",
    ),
    # tensorway's generic model.py (demo_models/triton_model.py), for BYTES over numeric tensors.
    _check(
        r"^(?P<input>\S+) must hold decimal integers",
        "inputs",
        lambda m: f"input {m['input']!r} must hold decimal integers, one per BYTES element",
    ),
    _check(
        r"^(?P<input>\S+) holds a value outside (?P<dtype>\w+)$",
        "inputs",
        lambda m: f"input {m['input']!r} holds a value outside {m['dtype']}",
    ),
)
UNARY_ON_DECOUPLED = "ModelInfer RPC doesn't support models with decoupled transaction policy"
"""Triton's refusal of a unary ModelInfer on a decoupled model (UNIMPLEMENTED), word for word."""
# The model was unloaded after its signature was cached: it may come back, another Triton may
# have it, so the caller may retry.
_MODEL_GONE_MARKER = "Request for unknown model"
# The Python backend's stub process for the model died on this Triton: another Triton may run it.
_STUB_UNHEALTHY = re.compile(r"Stub process '[^']*' is not healthy")


class ModelGone(Unavailable):
    """Triton no longer serves a model whose signature was cached, or cannot run it any more."""


def _spaced(shape: str) -> str:
    return shape.replace(",", ", ")


def without_request_id(message: str) -> str:
    """Triton's message without the "[request id: ...]" it starts with for requests that had one."""
    return _REQUEST_ID.sub("", message, count=1)


def request_fault(message: str, model: str) -> InvalidArgument | None:
    """The client error for a message of one of Triton's request checks; None for any other."""
    message = without_request_id(message)
    for check in _REQUEST_CHECKS:
        match = check.pattern.search(message)
        if match is not None:
            description = check.describe(match)
            return InvalidArgument(
                f"request does not fit model {model!r}: {description}",
                [FieldViolation(check.field, description)],
                reason=error_pb2.ERROR_REASON_TENSOR_INVALID,
                metadata={"model": model},
            )
    return None


def from_stream_error(message: str, model: str) -> TensorwayError:
    """The error for a request that failed on a ModelStreamInfer stream with `message`."""
    if message.startswith(_MODEL_GONE_MARKER) or _STUB_UNHEALTHY.search(message):
        return _model_gone(message, model)
    return request_fault(message, model) or _backend_error(message, model)


def from_rpc_error(error: grpc.aio.AioRpcError, model: str) -> TensorwayError:
    """The error for a unary call to Triton that failed with `error`."""
    code = error.code()
    message = error.details() or code.name
    metadata = {"model": model}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # Triton's own check in the mesh's words, else the model's own (a Python-backend model
        # answering TritonError.INVALID_ARG means the request is at fault).
        return request_fault(message, model) or InvalidArgument(
            without_request_id(message), reason=error_pb2.ERROR_REASON_TENSOR_INVALID, metadata=metadata
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return _model_gone(message, model)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"Triton did not answer in time for model {model!r}", metadata=metadata)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(message, metadata=metadata)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"Triton is unavailable: {message}", metadata=metadata)
    if _STUB_UNHEALTHY.search(message):
        return _model_gone(message, model)
    return _backend_error(message, model)


def _model_gone(message: str, model: str) -> ModelGone:
    return ModelGone(
        without_request_id(message), reason=error_pb2.ERROR_REASON_MODEL_NOT_READY, metadata={"model": model}
    )


def _backend_error(message: str, model: str) -> Internal:
    # The model's own message is about the model, not about tensorway's internals: safe and
    # useful to show, less the request id the orchestrator gave it.
    return Internal(
        without_request_id(message), reason=error_pb2.ERROR_REASON_BACKEND_ERROR, metadata={"model": model}
    )


def sequence_lost(model: str, step: SequenceStep, holder: str, why: str) -> Aborted:
    """ABORTED for a request of a stateful sequence whose state went with `holder` (the router's
    "endpoint", the orchestrator's "Triton"). Running it elsewhere would restart the sequence
    from nothing, silently: the client must."""
    return Aborted(
        f"sequence {step.id} of model {model!r} lost the {holder} that holds its state ({why}); "
        "start the sequence again",
        reason=error_pb2.ERROR_REASON_FAILED_PRECONDITION,
        metadata={"model": model, "sequence_id": step.id},
    )
