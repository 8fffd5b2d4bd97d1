"""Where a command's calls go: a mesh's Envoy, over TLS with a bearer token, as the context in use
says; or, for operators inside the network, a service's internal address given explicitly.

The order: an internal address given with the command's option (or its environment variable)
wins; else the context (`--context`, TENSORWAY_CONTEXT or the config file's current one); else,
with no context configured, the internal address of the local stack running in this directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import typer
from rich.markup import escape

from tensorway.cli.contexts import active_context
from tensorway.cli.errors import call, usage_error
from tensorway.devstack import status
from tensorway.runtime.interceptors import sending_metadata

AUTHORIZATION_HEADER = "authorization"
T = TypeVar("T")


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


@dataclass
class Target:
    """The service a command group calls: the option (and environment variable) that gives its
    internal address, and the address given, if any."""

    service: str
    option: str
    env_var: str
    timeout: float
    """How long each of the group's calls may take, in seconds."""
    address: str = ""
    tenant: str = ""
    """Where the group takes one: the tenant an internal caller acts as."""

    def address_option(self, description: str) -> Any:
        """The typer option that sets `address`, for the group's callback."""
        return typer.Option(self.option, envvar=self.env_var, help=description)

    def call(self, method: Callable[..., T], request: object) -> T:
        """One of the group's calls; a failure exits as `errors.call` says."""
        return call(method, request, self.timeout)

    def connect(self, internal_identity: Sequence[tuple[str, str]] = ()) -> Connection:
        return connect(
            self.service,
            self.address,
            option=self.option,
            env_var=self.env_var,
            internal_identity=internal_identity,
        )


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
