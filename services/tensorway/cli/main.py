"""`tensorway`: serve a service, run the local stack, and call a mesh: models, infer and batch,
through the current context's Envoy (`tensorway config`)."""

from __future__ import annotations

import asyncio
import importlib
from typing import Annotated, Protocol, cast

import typer
from rich.console import Console

from tensorway.cli.batch import batch_app
from tensorway.cli.bench import bench_app
from tensorway.cli.contexts import CONTEXT_ENV, config_app, select_context
from tensorway.cli.dev import dev_app
from tensorway.cli.envoy import envoy_app
from tensorway.cli.errors import EXIT_CODES_HELP
from tensorway.cli.infer import infer_command
from tensorway.cli.models import models_app
from tensorway.runtime import ServiceServer, ServiceSettings, configure_process, serve

app = typer.Typer(
    name="tensorway",
    help="tensorway: a gRPC-first inference mesh in front of NVIDIA Triton.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    epilog=EXIT_CODES_HELP,
)
app.add_typer(batch_app, name="batch")
app.add_typer(bench_app, name="bench")
app.add_typer(config_app, name="config")
app.add_typer(dev_app, name="dev")
app.add_typer(envoy_app, name="envoy")
app.add_typer(models_app, name="models")
app.command("infer")(infer_command)
console = Console(stderr=True)

# Service name → the module that builds it. Each module has `Settings` (a ServiceSettings with
# the env prefix TENSORWAY_<SERVICE>_) and `async def create(settings) -> (ServiceServer, port)`.
SERVICES: dict[str, str] = {
    "batch": "tensorway.batch.service",
    "batch-worker": "tensorway.batch.worker",
    "orchestrator": "tensorway.orchestrator.service",
    "registry": "tensorway.registry.service",
    "router": "tensorway.router.service",
}


@app.callback()
def tensorway(
    context: Annotated[
        str,
        typer.Option(
            "--context",
            envvar=CONTEXT_ENV,
            help="The context (mesh) to talk to; default the config file's current one.",
        ),
    ] = "",
) -> None:
    """tensorway: a gRPC-first inference mesh in front of NVIDIA Triton.

    models, infer and batch talk to the mesh of the current context (`tensorway config`): its
    Envoy over TLS, with a bearer token. `tensorway dev up` writes the context `local` for the
    local stack. Data commands take -o table|json|yaml.
    """
    select_context(context)


class ServiceModule(Protocol):
    Settings: type[ServiceSettings]

    async def create(self, settings: ServiceSettings) -> tuple[ServiceServer, int]: ...


@app.command("serve")
def serve_command(
    service: Annotated[str, typer.Argument(help="The service to run.")],
    port: Annotated[int | None, typer.Option(help="gRPC port; overrides the environment.")] = None,
) -> None:
    """Run one tensorway service until SIGTERM or SIGINT."""
    if service not in SERVICES:
        known = ", ".join(sorted(SERVICES)) or "none yet"
        console.print(f"[red]unknown service {service!r}[/red]; known: {known}")
        raise typer.Exit(2)
    module = cast(ServiceModule, importlib.import_module(SERVICES[service]))
    settings = module.Settings() if port is None else module.Settings(port=port)
    configure_process(service, settings)

    def created(bound: int) -> None:
        console.print(f"{service} listening on {settings.host}:{bound}")

    asyncio.run(serve(module.create(settings), created))


def main() -> None:
    app()
