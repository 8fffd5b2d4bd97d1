"""Every branch of the exception → status mapping, checked on the wire format clients read."""

from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tensorway.runtime import errors


def unpack(status: grpc.Status) -> tuple[grpc.StatusCode, str, dict[str, object]]:
    """Decode a grpc.Status as a client would: code, message, and details by type name."""
    call = _FakeCall(status)
    proto = rpc_status.from_call(call)
    assert proto is not None
    found: dict[str, object] = {}
    for detail in proto.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.ResourceInfo,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return status.code, proto.message, found


class _FakeCall:
    """rpc_status.from_call reads only these three accessors."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return tuple(self._status.trailing_metadata)


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (errors.InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (errors.NotFound("model", "nope"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (errors.AlreadyExists("model", "dup"), grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
        (errors.Aborted("stale etag"), grpc.StatusCode.ABORTED, "ETAG_MISMATCH"),
        (errors.FailedPrecondition("archived"), grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
        (errors.Unavailable("down"), grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
        (errors.ResourceExhausted("shed"), grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
        (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        (errors.Unauthenticated("who"), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
        (errors.PermissionDenied("no"), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
        (errors.Internal("safe message"), grpc.StatusCode.INTERNAL, "INTERNAL"),
    ],
)
def test_every_error_maps_to_its_code_and_reason(
    error: errors.TensorwayError, code: grpc.StatusCode, reason: str
) -> None:
    got_code, message, details = unpack(error.to_grpc_status())
    assert got_code == code
    assert message == error.message
    info = details["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == reason
    assert info.domain == errors.DOMAIN


def test_explicit_reason_and_metadata_override_the_default() -> None:
    from tensorway.common.v1 import error_pb2

    error = errors.NotFound(
        "model", "digits", reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND, metadata={"k": "v"}
    )
    _, _, details = unpack(error.to_grpc_status())
    info = details["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "MODEL_NOT_FOUND"
    assert dict(info.metadata) == {"k": "v"}


def test_invalid_argument_carries_field_violations() -> None:
    error = errors.InvalidArgument(
        "2 fields are invalid",
        [errors.FieldViolation("inputs[0].shape", "expected [16]"), errors.FieldViolation("id", "too long")],
    )
    _, _, details = unpack(error.to_grpc_status())
    bad = details["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("inputs[0].shape", "expected [16]"),
        ("id", "too long"),
    ]


def test_invalid_argument_without_violations_has_no_bad_request() -> None:
    _, _, details = unpack(errors.InvalidArgument("bad").to_grpc_status())
    assert set(details) == {"ErrorInfo"}


@pytest.mark.parametrize("kind", [errors.NotFound, errors.AlreadyExists])
def test_resource_errors_carry_resource_info_and_a_default_message(kind: type[errors.NotFound]) -> None:
    _, message, details = unpack(kind("model", "digits").to_grpc_status())
    info = details["ResourceInfo"]
    assert isinstance(info, error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("model", "digits")
    assert "digits" in message


@pytest.mark.parametrize("kind", [errors.Unavailable, errors.ResourceExhausted])
def test_retryable_errors_carry_retry_info(kind: type[errors.Unavailable]) -> None:
    _, _, details = unpack(kind("later", retry_after=timedelta(milliseconds=250)).to_grpc_status())
    retry = details["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta() == timedelta(milliseconds=250)


def test_unexpected_errors_get_a_generic_internal_status() -> None:
    code, message, details = unpack(errors.internal_status())
    assert code == grpc.StatusCode.INTERNAL
    assert message == errors.GENERIC_INTERNAL_MESSAGE
    assert set(details) == {"ErrorInfo"}
