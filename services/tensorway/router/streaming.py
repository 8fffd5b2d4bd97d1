"""What both public APIs share: the caller's route key, and the error a failed request of a
stream answers with instead of ending the stream. The stream's fan-out itself (answers in request
order, a bounded number in flight, a sequence's requests in order) is the runtime's
(`tensorway.runtime.streams`), shared with the orchestrator."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from tensorway.runtime import errors

logger = logging.getLogger(__name__)


def route_key(context: grpc.aio.ServicerContext[Any, Any], header: str) -> str | None:
    """The caller's route key (the value of `header`), if it sent one."""
    for key, value in context.invocation_metadata() or ():
        if key == header and isinstance(value, str):
            return value
    return None


def status_of(error: BaseException) -> Any:
    """The google.rpc.Status a unary call would have failed with, for an error sent on a stream."""
    if isinstance(error, errors.TensorwayError):
        return error.to_status_proto()
    if isinstance(error, grpc.aio.AioRpcError):
        # A downstream tensorway service's status, with its details, passes through as it is.
        downstream = rpc_status.from_call(error)
        if downstream is not None:
            return downstream
        return status_pb2.Status(code=error.code().value[0], message=error.details() or "")
    logger.error("unhandled error in a stream", exc_info=error)
    return errors.Internal(errors.GENERIC_INTERNAL_MESSAGE).to_status_proto()
