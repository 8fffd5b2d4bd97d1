"""`tensorway models` against a real registry: each command, and how failures read."""

from __future__ import annotations

import asyncio

from typer.testing import CliRunner, Result

from tensorway.cli.main import app

from .conftest import RunningRegistry, unique


async def tensorway(registry: RunningRegistry, *args: str) -> Result:
    # The CLI's blocking gRPC calls run in a thread: the registry shares this event loop.
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke,
        app,
        ["models", "--registry", registry.address, *args],
        env={"COLUMNS": "250"},  # wide enough that no table cell wraps
        catch_exceptions=False,
    )


async def test_register_deploy_promote_split_and_show(registry: RunningRegistry) -> None:
    model, pool = unique("cli"), unique("pool")
    spec = [
        "--artifact-uri",
        f"s3://models/{model}/1",
        "--input",
        "input:FP32:64",
        "--output",
        "label:INT64:1",
    ]
    registered = await tensorway(
        registry, "register", model, *spec, "--max-batch-size", "8", "--label", "team=cli"
    )
    assert registered.exit_code == 0, registered.output
    assert "DRAFT" in registered.output
    assert "input FP32[64]" in registered.output
    assert (await tensorway(registry, "register", model, *spec)).exit_code == 0  # version 2

    deployed = await tensorway(
        registry, "deploy", model, "--version", "1", "--pool", pool, "--endpoint", "127.1.1.1:9000"
    )
    assert deployed.exit_code == 0, deployed.output
    assert "1: 100%" in deployed.output

    promoted = await tensorway(registry, "promote", model, "1")
    assert promoted.exit_code == 0, promoted.output
    assert "STAGING" in promoted.output
    assert "PRODUCTION" in (await tensorway(registry, "promote", model, "1")).output

    split = await tensorway(registry, "traffic", model, "1=80", "2=20")
    assert split.exit_code == 0, split.output
    assert "1: 80%, 2: 20%" in split.output

    listed = await tensorway(registry, "list", "--filter", "team=cli")
    assert model in listed.output
    shown = await tensorway(registry, "show", model)
    assert shown.exit_code == 0, shown.output
    assert "default version 1" in shown.output
    assert "127.1.1.1:9000" in shown.output


async def test_failures_print_the_reason_and_the_fields(registry: RunningRegistry) -> None:
    model = unique("cli")
    bad = await tensorway(
        registry,
        "register",
        model,
        "--artifact-uri",
        "s3://x/1",
        "--input",
        "x:FLOAT:4",
        "--output",
        "y:FP32:0",
    )
    assert bad.exit_code == 1
    assert "INVALID_ARGUMENT" in bad.output
    assert "model_version.inputs[0].datatype" in bad.output
    assert "model_version.outputs[0].shape" in bad.output
    missing = await tensorway(registry, "show", unique("absent"))
    assert missing.exit_code == 1
    assert "NOT_FOUND" in missing.output
    weights = await tensorway(registry, "traffic", model, "1=abc")
    assert weights.exit_code == 2


def test_an_address_is_required() -> None:
    result = CliRunner().invoke(app, ["models", "list"], env={"TENSORWAY_REGISTRY_ADDRESS": ""})
    assert result.exit_code == 2
    assert "TENSORWAY_REGISTRY_ADDRESS" in result.output
