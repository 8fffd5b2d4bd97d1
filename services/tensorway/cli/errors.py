"""How a command fails: the gRPC status and its google.rpc details on stderr, and an exit code a
script can act on.

Exit codes:

- 0: done.
- 1: the command ran and the outcome is a failure: a batch job that did not succeed, a download
  whose checksum does not match, or a server fault (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED).
- 2: fix the call: a usage error, or the server refused it (INVALID_ARGUMENT, NOT_FOUND,
  ALREADY_EXISTS, PERMISSION_DENIED, UNAUTHENTICATED, FAILED_PRECONDITION, OUT_OF_RANGE,
  CANCELLED), or no mesh is configured.
- 3: try again later: the mesh is unavailable or busy (UNAVAILABLE, DEADLINE_EXCEEDED,
  RESOURCE_EXHAUSTED, ABORTED); RetryInfo, when the server sent it, says how long to wait.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import typer
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.markup import escape

T = TypeVar("T")


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    CLIENT_ERROR = 2
    UNAVAILABLE = 3


EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 the outcome is a failure (a batch job that did not succeed, a server fault);"
    " 2 fix the call (usage, INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED,"
    " FAILED_PRECONDITION...); 3 try again later (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,"
    " ABORTED)."
)

UNAVAILABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
CLIENT_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.CANCELLED,
    }
)

_err = Console(stderr=True, highlight=False)


def exit_code(code: grpc.StatusCode) -> ExitCode:
    """The exit code for a call that failed with `code`."""
    if code in UNAVAILABLE_CODES:
        return ExitCode.UNAVAILABLE
    if code in CLIENT_ERROR_CODES:
        return ExitCode.CLIENT_ERROR
    return ExitCode.FAILED


def status_code(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN


def report(error: grpc.RpcError) -> None:
    """Print a failed call to stderr: its code and message, then ErrorInfo's reason, BadRequest's
    field violations, RetryInfo's delay and ResourceInfo's resource where the status carries them."""
    code = status_code(error)
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    _err.print(f"[bold red]{code.name}[/bold red]: {escape(details or '')}")
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    attached: Sequence[Any] = status.details if status is not None else ()
    for detail in attached:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            extra = "".join(f" {k}={v}" for k, v in sorted(info.metadata.items()))
            _err.print(f"  reason: {escape(info.reason)} ({escape(info.domain)}){escape(extra)}")
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                _err.print(f"  [yellow]{escape(violation.field)}[/yellow]: {escape(violation.description)}")
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            _err.print(f"  retry after {retry.retry_delay.ToTimedelta().total_seconds():g}s")
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
            _err.print(f"  resource: {escape(resource.resource_type)} {escape(resource.resource_name)}")


def fail(error: grpc.RpcError) -> typer.Exit:
    """Report a failed call; the exit to raise, with the code its status calls for."""
    report(error)
    return typer.Exit(exit_code(status_code(error)))


def call(method: Callable[..., T], request: object, timeout: float) -> T:
    """One unary call; a failure is reported (its status details, RetryInfo's delay among them)
    and exits with the code its status calls for. Every command group's calls go through here."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as error:
        raise fail(error) from None


def usage_error(message: str) -> typer.Exit:
    """Print a problem the caller must fix (rich markup allowed) and the exit to raise."""
    _err.print(message)
    return typer.Exit(ExitCode.CLIENT_ERROR)
