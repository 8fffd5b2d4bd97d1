"""`tensorway dev`: run the local stack (PostgreSQL, Redis, Kafka, S3, Triton, Envoy)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tensorway.cli.contexts import LOCAL_CONTEXT, save_local_context
from tensorway.cli.envoy import token_command
from tensorway.cli.output import OutputFormat, OutputOption, emit, key_column, print_table
from tensorway.devstack import (
    COMPONENT_NAMES,
    ComponentRecord,
    DevStackError,
    DevStackSettings,
    Stack,
    StackState,
    default_components,
    demo_request,
    up_with_demo_models,
)
from tensorway.devstack._envoy import jwt_key_dir, local_certificates
from tensorway.edge.config import load_values
from tensorway.edge.keys import PRIVATE_KEY_FILE

dev_app = typer.Typer(
    name="dev",
    help="Run the local stack from pip packages on free loopback ports.",
    no_args_is_help=True,
)
# Signs with the key `dev up` made, so it lives with the edge code that made it.
dev_app.command("token")(token_command)
_out = Console()
_err = Console(stderr=True)

StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", help="State dir of the stack; default TENSORWAY_DEV_STATE_DIR or .tensorway."
    ),
]


def _stack(state_dir: Path | None) -> Stack:
    return Stack(
        DevStackSettings(), state_dir=state_dir, components=default_components(models_from_registry=True)
    )


def _fail(error: DevStackError) -> typer.Exit:
    # Problems quote server logs, whose brackets are not rich markup.
    _err.print(f"[bold red]{escape(error.component)}[/bold red]: {escape(error.problem)}", highlight=False)
    if error.hint:
        _err.print(f"[yellow]hint[/yellow]: {escape(error.hint)}", highlight=False)
    return typer.Exit(1)


def _endpoint_table(state: StackState) -> Table:
    # Addresses and URLs stay whole on one line, so they can be copied.
    table = Table(key_column("component"), key_column("endpoint"), key_column("address"), "pid")
    table.add_column("url", no_wrap=True, overflow="ignore")
    for component, record in state.components.items():
        for name, endpoint in record.endpoints.items():
            table.add_row(component, name, endpoint.address, str(record.pid), endpoint.url or "")
    return table


@dev_app.command("up")
def up_command(
    components: Annotated[
        list[str] | None,
        typer.Argument(help=f"Components to start (default all): {', '.join(COMPONENT_NAMES)}."),
    ] = None,
    state_dir: StateDirOption = None,
    with_prometheus: Annotated[
        bool,
        typer.Option(
            "--with-prometheus", help="Also start Prometheus (Debian's package), scraping every service."
        ),
    ] = False,
) -> None:
    """Start the stack in the background and print its endpoints."""
    stack = _stack(state_dir)
    began = time.monotonic()

    def answered(name: str, record: ComponentRecord) -> None:
        # Components start side by side, so each line says when it answered and what its own start took.
        took = record.start_seconds or 0.0
        at = time.monotonic() - began
        _err.print(f"{at:5.1f}s  {name} answered (its start took {took:.1f}s)", highlight=False)

    try:
        with _err.status("starting the local stack and registering the demo models…"):
            state, models = up_with_demo_models(stack, components or None, on_started=answered)
            if models:
                _err.print(f"{time.monotonic() - began:5.1f}s  demo models ready", highlight=False)
            if with_prometheus:
                # Started last, so its scrape config lists everything the first call started.
                state = stack.up(["prometheus"], on_started=answered)
    except DevStackError as error:
        raise _fail(error) from None
    print_table(_out, _endpoint_table(state))
    addresses = state.addresses()
    if models:
        _out.print(f"registered demo models in pool pools/local: {', '.join(models)}")
    if "router" in addresses:
        sums, differences = demo_request(addresses["router"])
        _out.print(f"demo request: simple([0..15], [1]*16) via the router at {addresses['router']}")
        _out.print(f"  OUTPUT0 (sum)        = {sums}")
        _out.print(f"  OUTPUT1 (difference) = {differences}")
    envoy = state.endpoints().get("envoy")
    if envoy is not None and envoy.url:
        ca = local_certificates(stack.state_dir).ca
        _out.print(
            f"Envoy serves TLS at {envoy.url} with a certificate of the local CA {ca};"
            " tokens: tensorway dev token --tenant NAME [--admin]"
        )
        jwt = load_values(DevStackSettings().envoy_profile)["jwt"]
        config = save_local_context(
            envoy.url,
            ca,
            jwt_key_dir(stack.state_dir) / PRIVATE_KEY_FILE,
            issuer=jwt["issuer"],
            audience=jwt["audiences"][0],
        )
        _out.print(
            f"current context: {LOCAL_CONTEXT} (in {config}): models, infer and batch go through Envoy"
            " with an admin token minted for each command"
        )
    _out.print(f"state and logs in {stack.state_dir}; stop with: tensorway dev down")
    _err.print(f"up in {time.monotonic() - began:.1f}s", highlight=False)


@dev_app.command("down")
def down_command(state_dir: StateDirOption = None) -> None:
    """Stop every component the state dir records."""
    stack = _stack(state_dir)
    try:
        stopped = stack.down()
    except DevStackError as error:
        raise _fail(error) from None
    if stopped:
        _out.print("stopped " + ", ".join(stopped))
    else:
        _out.print(f"nothing was running in {stack.state_dir}")


@dev_app.command("status")
def status_command(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on one line: endpoint name → host:port.")
    ] = False,
    state_dir: StateDirOption = None,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Say what runs: a table, or with --json (-o json, -o yaml) one object mapping names to addresses."""
    try:
        state = _stack(state_dir).status()
    except DevStackError as error:
        raise _fail(error) from None
    if as_json:
        typer.echo(json.dumps(state.addresses()))
        return

    def table() -> None:
        if state.components:
            print_table(_out, _endpoint_table(state))
        else:
            _out.print("the local stack is not running")

    emit(output, state.addresses(), table)
