"""Per-request state: the request id, tenant and scopes of the call being served.

The server interceptor sets them from the incoming metadata; log records and outgoing calls
read them, so a request can be followed across services without passing them by hand.

Identity travels in two headers that Envoy sets from the verified token, after removing any a
client sent: the tenant (`x-tenant-id`) and the token's scopes (`x-tensorway-scopes`, space
separated, as in OAuth 2's `scope` claim). A service checks the scopes again with
`require_scope`, so a caller inside the network that sends no identity cannot write.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field

from tensorway.common.v1 import error_pb2
from tensorway.runtime.errors import PermissionDenied

REQUEST_ID_HEADER = "x-request-id"
TENANT_HEADER = "x-tenant-id"
SCOPES_HEADER = "x-tensorway-scopes"
DEFAULT_TENANT = "default"


class Scope(enum.StrEnum):
    """What a token allows. A tenant token carries the first three; an admin token all four."""

    INFER = "infer"
    """Inference through either API (tensorway's and Triton's)."""
    BATCH = "batch"
    """Batch jobs of the token's own tenant: create, read, cancel, upload inputs."""
    MODELS_READ = "models.read"
    """Read the registry: models, versions, deployments, pools (without their addresses)."""
    MODELS_WRITE = "models.write"
    """Write the registry (models, versions, pools, deployments) and see pool addresses: admin."""


TENANT_SCOPES = (Scope.INFER, Scope.BATCH, Scope.MODELS_READ)
ADMIN_SCOPES = (*TENANT_SCOPES, Scope.MODELS_WRITE)


def parse_scopes(value: str) -> frozenset[str]:
    """The scopes of a space-separated `scope` value; unknown ones are kept and grant nothing."""
    return frozenset(value.split())


@dataclass(frozen=True)
class RequestContext:
    """Who asked, with which scopes, and which request this is."""

    request_id: str
    tenant: str = DEFAULT_TENANT
    scopes: frozenset[str] = field(default_factory=frozenset)
    # time.monotonic() by which the caller wants an answer; outgoing calls inherit it.
    deadline: float | None = None

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, scope: Scope) -> bool:
        return scope.value in self.scopes


current: ContextVar[RequestContext | None] = ContextVar("tensorway_request", default=None)


def from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None, time_remaining: float | None = None
) -> RequestContext:
    """The caller's request id, tenant and scopes, minting a request id when the caller sent none."""
    values = {key: value for key, value in metadata or () if isinstance(value, str)}
    return RequestContext(
        # 32 random hex digits, as long as uuid4().hex and a fifth of its cost, on every call that
        # came without an id.
        request_id=values.get(REQUEST_ID_HEADER) or os.urandom(16).hex(),
        tenant=values.get(TENANT_HEADER) or DEFAULT_TENANT,
        scopes=parse_scopes(values.get(SCOPES_HEADER, "")),
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
    )


def identity_metadata(tenant: str, scopes: Iterable[Scope]) -> list[tuple[str, str]]:
    """The identity headers Envoy would set for a token of `tenant` with `scopes`: what an internal
    caller (a batch worker acting for a job's tenant, the dev tools) sends."""
    return [(TENANT_HEADER, tenant), (SCOPES_HEADER, " ".join(scope.value for scope in scopes))]


def outgoing_metadata() -> list[tuple[str, str]]:
    """Metadata that carries the current request's identity to a downstream call."""
    request = current.get()
    if request is None:
        return []
    return [
        (REQUEST_ID_HEADER, request.request_id),
        (TENANT_HEADER, request.tenant),
        (SCOPES_HEADER, " ".join(sorted(request.scopes))),
    ]


def caller() -> RequestContext:
    """The current call's context; outside a call, an anonymous one with no scopes."""
    return current.get() or RequestContext(request_id="")


def require_scope(scope: Scope) -> RequestContext:
    """The current call's context, or PERMISSION_DENIED when its token does not grant `scope`."""
    request = caller()
    if not request.allows(scope):
        raise PermissionDenied(
            f"this call needs the {scope.value!r} scope, which the caller's token does not grant",
            reason=error_pb2.ERROR_REASON_PERMISSION_DENIED,
            metadata={"scope": scope.value},
        )
    return request
