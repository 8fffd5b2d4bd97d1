"""Per-request state: the request id and tenant of the call being served.

The server interceptor sets them from the incoming metadata; log records and outgoing calls
read them, so a request can be followed across services without passing them by hand.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

REQUEST_ID_HEADER = "x-request-id"
# Set by Envoy from the verified token; services trust it only because only Envoy reaches them.
TENANT_HEADER = "x-tenant-id"
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class RequestContext:
    """Who asked, and which request this is."""

    request_id: str
    tenant: str = DEFAULT_TENANT
    # time.monotonic() by which the caller wants an answer; outgoing calls inherit it.
    deadline: float | None = None

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


current: ContextVar[RequestContext | None] = ContextVar("tensorway_request", default=None)


def from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None, time_remaining: float | None = None
) -> RequestContext:
    """The caller's request id and tenant, minting a request id when the caller sent none."""
    values = {key: value for key, value in metadata or () if isinstance(value, str)}
    return RequestContext(
        request_id=values.get(REQUEST_ID_HEADER) or uuid.uuid4().hex,
        tenant=values.get(TENANT_HEADER) or DEFAULT_TENANT,
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
    )


def outgoing_metadata() -> list[tuple[str, str]]:
    """Metadata that carries the current request's identity to a downstream call."""
    request = current.get()
    if request is None:
        return []
    return [(REQUEST_ID_HEADER, request.request_id), (TENANT_HEADER, request.tenant)]
