"""Triton's failures in the mesh's error model.

A unary call fails with a gRPC status whose code says what went wrong. A request failing on a
ModelStreamInfer stream carries only a message (the code is lost on the stream), so the
messages of Triton's own request checks are recognised; anything else is the backend's failure.
"""

from __future__ import annotations

import grpc

from tensorway.common.v1 import error_pb2
from tensorway.runtime import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    TensorwayError,
    Unavailable,
)

# Triton's request normalisation rejects a request with these words; the model never ran.
_INVALID_REQUEST_MARKERS = (
    "unexpected shape",
    "data-type is",
    "unexpected inference input",
    "unexpected inference output",
    "expected number of inputs",
    "unexpected number of string elements",
    "unexpected total byte size",
    "batch-size must be",
)
# The model was unloaded after its signature was cached: it may come back, another Triton may
# have it, so the caller may retry.
_MODEL_GONE_MARKER = "Request for unknown model"


class ModelGone(Unavailable):
    """Triton no longer serves a model whose signature was cached."""


def from_stream_error(message: str, model: str) -> TensorwayError:
    """The error for a request that failed on a ModelStreamInfer stream with `message`."""
    if message.startswith(_MODEL_GONE_MARKER):
        return _model_gone(message, model)
    if any(marker in message for marker in _INVALID_REQUEST_MARKERS):
        return InvalidArgument(
            message, reason=error_pb2.ERROR_REASON_TENSOR_INVALID, metadata={"model": model}
        )
    return _backend_error(message, model)


def from_rpc_error(error: grpc.aio.AioRpcError, model: str) -> TensorwayError:
    """The error for a unary call to Triton that failed with `error`."""
    code = error.code()
    message = error.details() or code.name
    metadata = {"model": model}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(message, reason=error_pb2.ERROR_REASON_TENSOR_INVALID, metadata=metadata)
    if code == grpc.StatusCode.NOT_FOUND:
        return _model_gone(message, model)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"Triton did not answer in time for model {model!r}", metadata=metadata)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(message, metadata=metadata)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"Triton is unavailable: {message}", metadata=metadata)
    return _backend_error(message, model)


def _model_gone(message: str, model: str) -> ModelGone:
    return ModelGone(message, reason=error_pb2.ERROR_REASON_MODEL_NOT_READY, metadata={"model": model})


def _backend_error(message: str, model: str) -> Internal:
    # Triton's message is about the model, not about tensorway's internals: safe and useful to show.
    return Internal(message, reason=error_pb2.ERROR_REASON_BACKEND_ERROR, metadata={"model": model})
