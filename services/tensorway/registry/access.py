"""Who may call what on the registry, from the identity Envoy forwards (`runtime.context`).

The rule, checked here again after Envoy checked it at the edge:

- **Writes need `models.write`.** Creating, updating or deleting a model, version, pool or
  deployment, TransitionModelVersionStage, and starting, pausing, resuming or aborting a
  rollout, are PERMISSION_DENIED without it, before the request is looked at, so a caller
  inside the network that sends no identity cannot write. The reports of orchestrators
  (ReportModelStates) and routers (ReportTraffic) are writes too: they call as the mesh's
  internal identity, and Envoy refuses both at the edge.
- **Reads are open, addresses are not.** Get, List and ResolveModel answer a caller without
  identity (an internal one: routers, orchestrators, tools); a caller that presents scopes came
  through Envoy (or acts for a tenant) and needs `models.read` (or `models.write`). Where
  backends live (pool endpoints, the endpoints inside a resolved route) is shown only to
  callers with `models.write`; everyone else gets the answer with those fields empty.
- **WatchRoutes is internal.** It streams every route with its endpoints to routers and
  orchestrators, which call it without identity. Envoy refuses it at the edge; a call that
  presents scopes anyway is served only with `models.write`.

The stack's own writers carry an admin identity: `SYSTEM_TENANT` for what the stack does by
itself (registering the demo models), `OPERATOR_TENANT` for the `tensorway models` CLI, which
talks to the registry directly rather than through Envoy.
"""

from __future__ import annotations

import grpc

from tensorway.runtime.context import ADMIN_SCOPES, Scope, caller, identity_metadata, require_scope
from tensorway.runtime.interceptors import sending_metadata

SYSTEM_TENANT = "system"
"""The identity of the stack's own registry writes (the demo models of `tensorway dev up`)."""
OPERATOR_TENANT = "operator"
"""The identity of the `tensorway models` CLI, an operator's tool on the internal network."""


def admin_metadata(tenant: str = SYSTEM_TENANT) -> list[tuple[str, str]]:
    """The headers of an internal caller that may write the registry."""
    return identity_metadata(tenant, ADMIN_SCOPES)


def admin_channel(channel: grpc.Channel, tenant: str) -> grpc.Channel:
    """`channel` with every unary call made as an admin of `tenant`: how the stack's own tools
    write the registry."""
    return sending_metadata(channel, admin_metadata(tenant))


def require_write() -> None:
    """PERMISSION_DENIED unless the caller may change the registry."""
    require_scope(Scope.MODELS_WRITE)


def require_read() -> None:
    """PERMISSION_DENIED for a caller that presents scopes none of which lets it read."""
    request = caller()
    if request.scopes and not request.allows(Scope.MODELS_WRITE):
        require_scope(Scope.MODELS_READ)


def require_internal() -> None:
    """PERMISSION_DENIED for a caller that presents scopes without `models.write`: internal
    callers of WatchRoutes send none."""
    if caller().scopes:
        require_scope(Scope.MODELS_WRITE)


def shows_addresses() -> bool:
    """Whether the caller may see where backends live."""
    return caller().allows(Scope.MODELS_WRITE)
