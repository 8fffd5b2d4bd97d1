"""`tensorway models rollout` against the mesh behind Envoy, as an operator with an admin's token
and as a tenant without models.write: the rollout named in JSON, in `models show`, moved by
--pause, --resume and --abort, and exit codes that tell a refusal from an unreachable mesh."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner, Result

from tensorway.cli.errors import ExitCode
from tensorway.cli.main import app
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tests.edge_mesh import Edge
from tests.security.test_rollouts_edge import Model, create_model, rollouts, traffic


class Cli:
    """The CLI with its own config file whose current context is the edge mesh with one token."""

    def __init__(self, edge: Edge, directory: Path, token: str) -> None:
        token_file = directory / "token"
        token_file.write_text(token + "\n")
        self.env = {"TENSORWAY_CONFIG": str(directory / "config.yaml"), "TENSORWAY_CONTEXT": ""}
        made = self("config", "set-context", "edge", "--endpoint", edge.url, "--token-file", str(token_file),
                    "--ca", str(edge.ca))  # fmt: skip
        assert made.exit_code == 0, made.output
        assert self("config", "use-context", "edge").exit_code == 0

    def __call__(self, *args: str) -> Result:
        return CliRunner().invoke(app, list(args), env=self.env, catch_exceptions=False)

    def json(self, *args: str) -> Any:
        result = self(*args, "-o", "json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


@pytest.fixture
def operator(edge: Edge, tmp_path: Path) -> Cli:
    (tmp_path / "operator").mkdir()
    return Cli(edge, tmp_path / "operator", edge.token("ops", admin=True))


@pytest.fixture
def tenant(edge: Edge, tmp_path: Path) -> Cli:
    (tmp_path / "tenant").mkdir()
    return Cli(edge, tmp_path / "tenant", edge.token("cli-tenant"))


@pytest.fixture
def model(edge: Edge) -> Model:
    with edge.channel() as channel:
        return create_model(edge, registry_grpc.RegistryServiceStub(channel))


def test_a_rollout_started_paused_resumed_and_aborted_from_the_cli(
    operator: Cli, edge: Edge, model: Model
) -> None:
    started = operator.json("models", "rollout", model.name, "--version", "2", "--steps", "20,60,100",
                            "--interval", "1h", "--min-requests", "50")  # fmt: skip
    assert started["name"].startswith(f"{model.resource}/rollouts/")
    assert started["state"] == "ROLLOUT_STATE_RUNNING"
    assert (started["from_version"], started["to_version"]) == ("1", "2")
    assert started["steps"] == [20, 60, 100]
    assert started["interval"] == "3600s"
    assert started["bounds"]["min_requests"] == "50"
    assert traffic(edge, model) == {"1": 80, "2": 20}

    shown = operator.json("models", "show", model.name)
    assert [r["name"] for r in shown["rollouts"]] == [started["name"]]
    assert shown["rollouts"][0]["state"] == "ROLLOUT_STATE_RUNNING"
    table = operator("models", "show", model.name)
    assert table.exit_code == 0, table.output
    assert started["name"] in table.stdout

    paused = operator.json("models", "rollout", model.name, "--pause")
    assert (paused["name"], paused["state"]) == (started["name"], "ROLLOUT_STATE_PAUSED")
    assert operator.json("models", "show", model.name)["rollouts"][0]["state"] == "ROLLOUT_STATE_PAUSED"
    assert traffic(edge, model) == {"1": 80, "2": 20}
    resumed = operator.json("models", "rollout", model.name, "--resume")
    assert resumed["state"] == "ROLLOUT_STATE_RUNNING"
    aborted = operator.json("models", "rollout", model.name, "--abort")
    assert aborted["state"] == "ROLLOUT_STATE_ABORTED"
    assert traffic(edge, model) == {"1": 100, "2": 0}

    # Nothing left to act on: a client error, said as such.
    nothing = operator("models", "rollout", model.name, "--pause")
    assert nothing.exit_code == ExitCode.CLIENT_ERROR, nothing.output
    assert "no rollout running or paused" in nothing.stderr


def test_refusals_are_client_errors_and_change_nothing(
    operator: Cli, tenant: Cli, edge: Edge, model: Model
) -> None:
    denied = tenant("models", "rollout", model.name, "--version", "2", "--steps", "100")
    assert denied.exit_code == ExitCode.CLIENT_ERROR, denied.output
    assert "PERMISSION_DENIED" in denied.stderr
    assert rollouts(edge, model) == []

    started = operator.json("models", "rollout", model.name, "--version", "2", "--steps", "10,100",
                            "--interval", "1h")  # fmt: skip
    for action in ("--pause", "--abort"):
        refused = tenant("models", "rollout", model.name, action)
        assert refused.exit_code == ExitCode.CLIENT_ERROR, (action, refused.output)
        assert "PERMISSION_DENIED" in refused.stderr
    assert operator.json("models", "rollout", model.name, "--pause")["state"] == "ROLLOUT_STATE_PAUSED"
    refused = tenant("models", "rollout", model.name, "--resume")
    assert refused.exit_code == ExitCode.CLIENT_ERROR, refused.output
    assert "PERMISSION_DENIED" in refused.stderr
    [still] = rollouts(edge, model)
    assert (still["name"], still["state"]) == (started["name"], "ROLLOUT_STATE_PAUSED")
    assert traffic(edge, model) == {"1": 90, "2": 10}

    # The server's refusal of a careless rollout names the field to fix.
    careless = operator("models", "rollout", model.name, "--version", "2", "--steps", "50,20,100")
    assert careless.exit_code == ExitCode.CLIENT_ERROR, careless.output
    assert "INVALID_ARGUMENT" in careless.stderr
    assert "rollout.steps" in careless.stderr
    missing = operator("models", "rollout", "no-such-model", "--version", "2")
    assert missing.exit_code == ExitCode.CLIENT_ERROR, missing.output
    assert "NOT_FOUND" in missing.stderr
    # Usage mistakes never reach the server.
    both = operator("models", "rollout", model.name, "--version", "2", "--abort")
    assert both.exit_code == ExitCode.CLIENT_ERROR, both.output
    assert [r["state"] for r in rollouts(edge, model)] == ["ROLLOUT_STATE_PAUSED"]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused while it is held."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def test_an_unreachable_mesh_is_unavailable_not_a_client_error(
    operator: Cli, edge: Edge, closed_port: int
) -> None:
    gone = f"https://127.0.0.1:{closed_port}"
    assert operator("config", "set-context", "gone", "--endpoint", gone, "--ca", str(edge.ca)).exit_code == 0
    for args in (("--version", "2"), ("--pause",), ("--abort",)):
        result = operator("--context", "gone", "models", "rollout", "anything", *args)
        assert result.exit_code == ExitCode.UNAVAILABLE, (args, result.output)
        assert grpc.StatusCode.UNAVAILABLE.name in result.stderr
