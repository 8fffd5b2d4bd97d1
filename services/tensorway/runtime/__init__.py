"""The runtime every tensorway service shares: one server factory, one settings style, one
error model, request context, structured logs, metrics and tracing."""

from tensorway.runtime.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TensorwayError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from tensorway.runtime.server import (
    ServiceBinding,
    ServiceServer,
    configure_process,
    create_channel,
    create_server,
    serve,
)
from tensorway.runtime.settings import ServiceSettings

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceBinding",
    "ServiceServer",
    "ServiceSettings",
    "TensorwayError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "configure_process",
    "create_channel",
    "create_server",
    "serve",
]
