"""The one exception tree of tensorway, and its mapping to gRPC status with google.rpc details.

Services raise these; the server interceptor turns them into a status whose details carry
`ErrorInfo` (always) plus `BadRequest`, `ResourceInfo` or `RetryInfo` where they fit. Anything
else that escapes a handler becomes INTERNAL with a generic message, so internals never leak.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tensorway.common.v1 import error_pb2

DOMAIN = "tensorway.io"
GENERIC_INTERNAL_MESSAGE = "internal error; the server logged the details"
# The status travels in trailing metadata, which clients refuse past 16 KiB (8 KiB by default
# for some): text a caller sent, echoed back in full, must not push an error over that.
MAX_ECHOED_CHARS = 512
MAX_FIELD_VIOLATIONS = 10


def clipped(text: str) -> str:
    """`text`, cut to MAX_ECHOED_CHARS with a note of how much was left out."""
    if len(text) <= MAX_ECHOED_CHARS:
        return text
    return f"{text[:MAX_ECHOED_CHARS]}... ({len(text) - MAX_ECHOED_CHARS} more characters)"


def reason_name(reason: int) -> str:
    """`ERROR_REASON_MODEL_NOT_FOUND` → `MODEL_NOT_FOUND`, the string clients see."""
    return error_pb2.ErrorReason.Name(error_pb2.ErrorReason.ValueType(reason)).removeprefix("ERROR_REASON_")


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: its path (e.g. `inputs[0].shape`) and why."""

    field: str
    description: str


def bad_request(violations: Sequence[FieldViolation]) -> error_details_pb2.BadRequest:
    """The google.rpc.BadRequest detail naming `violations` (at most MAX_FIELD_VIOLATIONS)."""
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=clipped(v.field), description=clipped(v.description)
            )
            for v in violations[:MAX_FIELD_VIOLATIONS]
        ]
    )


class TensorwayError(Exception):
    """Base of every error a tensorway service reports to its callers."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: int = error_pb2.ERROR_REASON_INTERNAL

    def __init_subclass__(
        cls, *, code: grpc.StatusCode | None = None, reason: int | None = None, **kwargs: Any
    ) -> None:
        """`class X(TensorwayError, code=...)`: the status X maps to, and the ErrorInfo reason
        it carries unless raised with another (by default the reason named as the code is)."""
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if reason is not None:
            cls.default_reason = reason
        elif code is not None:
            cls.default_reason = error_pb2.ErrorReason.Value(f"ERROR_REASON_{code.name}")

    def __init__(
        self,
        message: str,
        *,
        reason: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = self.default_reason if reason is None else reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[Message]:
        """Details beyond ErrorInfo that this kind of error carries."""
        return []

    def to_status_proto(self) -> Any:
        """The google.rpc.Status message for this error."""
        info = error_details_pb2.ErrorInfo(
            reason=reason_name(self.reason),
            domain=DOMAIN,
            metadata={clipped(key): clipped(value) for key, value in self.metadata.items()},
        )
        packed = []
        for detail in (info, *self.details()):
            wrapper = any_pb2.Any()
            wrapper.Pack(detail)
            packed.append(wrapper)
        return status_pb2.Status(code=self.code.value[0], message=clipped(self.message), details=packed)

    def to_grpc_status(self) -> grpc.Status:
        status: grpc.Status = rpc_status.to_status(self.to_status_proto())
        return status


class InvalidArgument(TensorwayError, code=grpc.StatusCode.INVALID_ARGUMENT):
    """The request is malformed; `violations` name the fields (google.rpc.BadRequest)."""

    def __init__(
        self,
        message: str,
        violations: Sequence[FieldViolation] = (),
        *,
        reason: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)

    def details(self) -> list[Message]:
        if not self.violations:
            return []
        return [bad_request(self.violations)]


class _ResourceError(TensorwayError):
    """An error about one named resource (google.rpc.ResourceInfo)."""

    template = "{type} {name!r}"

    def __init__(
        self,
        resource_type: str,
        resource_name: str,
        message: str | None = None,
        *,
        reason: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        default = self.template.format(type=resource_type, name=clipped(resource_name))
        super().__init__(message or default, reason=reason, metadata=metadata)
        self.resource_type = resource_type
        self.resource_name = resource_name

    def details(self) -> list[Message]:
        return [
            error_details_pb2.ResourceInfo(
                resource_type=self.resource_type, resource_name=clipped(self.resource_name)
            )
        ]


class NotFound(_ResourceError, code=grpc.StatusCode.NOT_FOUND):
    """The named resource does not exist."""

    template = "{type} {name!r} not found"


class AlreadyExists(_ResourceError, code=grpc.StatusCode.ALREADY_EXISTS):
    """The resource to create exists already."""

    template = "{type} {name!r} already exists"


class Aborted(TensorwayError, code=grpc.StatusCode.ABORTED, reason=error_pb2.ERROR_REASON_ETAG_MISMATCH):
    """A concurrent change won (for example a stale etag): read again and retry."""


class FailedPrecondition(TensorwayError, code=grpc.StatusCode.FAILED_PRECONDITION):
    """The system is not in a state that allows the call; fix the state first."""


class _RetryableError(TensorwayError):
    """An error the caller may retry after a delay (google.rpc.RetryInfo)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: timedelta = timedelta(seconds=1),
        reason: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after

    def details(self) -> list[Message]:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(self.retry_after)
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class Unavailable(_RetryableError, code=grpc.StatusCode.UNAVAILABLE):
    """A dependency is down or the model is not ready; the caller may retry."""


class ResourceExhausted(_RetryableError, code=grpc.StatusCode.RESOURCE_EXHAUSTED):
    """Load shedding or a rate limit; the caller may retry after the delay."""


# The codes of the two errors above, which tell the caller the same call may well succeed: on
# another endpoint at once, or here after the delay their RetryInfo gives.
RETRYABLE_CODES = frozenset({Unavailable.code, ResourceExhausted.code})


class DeadlineExceeded(TensorwayError, code=grpc.StatusCode.DEADLINE_EXCEEDED):
    """The deadline passed before the work finished."""


class Unauthenticated(TensorwayError, code=grpc.StatusCode.UNAUTHENTICATED):
    """The caller did not prove who it is."""


class PermissionDenied(TensorwayError, code=grpc.StatusCode.PERMISSION_DENIED):
    """The caller may not do this."""


class Unimplemented(
    TensorwayError, code=grpc.StatusCode.UNIMPLEMENTED, reason=error_pb2.ERROR_REASON_FAILED_PRECONDITION
):
    """The server does not serve this method (a generated servicer method left as it came)."""


class Internal(TensorwayError):
    """A failure inside tensorway that the caller cannot fix. The message must be safe to show."""


def internal_status() -> grpc.Status:
    """The status for an unexpected exception: generic, so nothing internal leaks."""
    return Internal(GENERIC_INTERNAL_MESSAGE).to_grpc_status()
