"""Where the operator commands find a service: the option or its environment variable, else
the local stack that `tensorway dev up` started in this directory."""

from __future__ import annotations

from dataclasses import dataclass

import typer
from rich.console import Console

from tensorway.devstack import DevStackSettings, status


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


@dataclass(frozen=True)
class S3Access:
    endpoint: str
    access_key: str
    secret_key: str


def local_s3() -> S3Access:
    """The local stack's S3 and the credentials `tensorway dev up` gave it."""
    endpoint = status().endpoints().get("s3")
    if endpoint is None or endpoint.url is None:
        Console(stderr=True).print(
            "[red]no S3 endpoint[/red]: pass --s3-endpoint, set TENSORWAY_S3_ENDPOINT, "
            "or start the local stack with `tensorway dev up`"
        )
        raise typer.Exit(2)
    settings = DevStackSettings()
    return S3Access(endpoint.url, settings.s3_access_key, settings.s3_secret_key)
