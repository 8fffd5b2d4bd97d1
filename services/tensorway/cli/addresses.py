"""Where the operator commands find a service: the option or its environment variable, else
the local stack that `tensorway dev up` started in this directory."""

from __future__ import annotations

import typer
from rich.console import Console

from tensorway.devstack import status


def service_address(given: str, service: str, option: str, env_var: str) -> str:
    """`given` when set, else the running local stack's address of `service`; exits clearly
    when neither is there."""
    if given:
        return given
    local = status().addresses().get(service)
    if local:
        return local
    Console(stderr=True).print(
        f"[red]no {service} address[/red]: pass {option} HOST:PORT, set {env_var}, "
        "or start the local stack with `tensorway dev up`"
    )
    raise typer.Exit(2)
