"""Where a command's calls go: a mesh's Envoy, over TLS with a bearer token, as the context in use
says; or, for operators inside the network, a service's internal address given explicitly.

The order: an internal address given with the command's option (or its environment variable)
wins; else the context (`--context`, TENSORWAY_CONTEXT or the config file's current one); else,
with no context configured, the internal address of the local stack running in this directory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from rich.markup import escape

from tensorway.cli.contexts import active_context
from tensorway.cli.errors import usage_error
from tensorway.devstack import status
from tensorway.runtime.interceptors import sending_metadata

AUTHORIZATION_HEADER = "authorization"


@dataclass(frozen=True)
class Connection:
    """One service as a command reaches it."""

    address: str
    """``HOST:PORT`` to dial."""
    credentials: grpc.ChannelCredentials | None
    """TLS through Envoy; none for an internal address, which is plaintext inside the network."""
    metadata: tuple[tuple[str, str], ...]
    """Sent with every call: the bearer token, or the identity an internal caller asserts."""
    context: str | None
    """The context's name; none for an internal address."""

    @property
    def through_envoy(self) -> bool:
        return self.context is not None

    @contextmanager
    def channel(self) -> Iterator[grpc.Channel]:
        if self.credentials is None:
            raw = grpc.insecure_channel(self.address)
        else:
            raw = grpc.secure_channel(self.address, self.credentials)
        with raw:
            yield sending_metadata(raw, self.metadata)


def connect(
    service: str,
    given: str,
    *,
    option: str,
    env_var: str,
    internal_identity: Sequence[tuple[str, str]] = (),
) -> Connection:
    """How to reach `service`: at `given` (an internal address) when set, else through the active
    context's Envoy, else at the local stack's internal address; exits clearly when none is there.

    `internal_identity` is what the command asserts at an internal address, where no Envoy sets
    the caller's identity from a token.
    """
    if given:
        return Connection(given, None, tuple(internal_identity), None)
    active = active_context()
    if active is not None:
        name, context = active
        token = context.token()
        metadata = ((AUTHORIZATION_HEADER, f"Bearer {token}"),) if token else ()
        return Connection(context.address, context.credentials(), metadata, name)
    local = status().addresses().get(service)
    if local:
        return Connection(local, None, tuple(internal_identity), None)
    raise usage_error(
        f"[red]no {escape(service)} to talk to[/red]: start the local stack (`tensorway dev up`), "
        f"choose a mesh (`tensorway config set-context` and `use-context`), or, inside the network, "
        f"pass {option} HOST:PORT or set {env_var}"
    )
