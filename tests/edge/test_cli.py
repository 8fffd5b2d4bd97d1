"""The CLI against a mesh it reaches only through Envoy: a context names Envoy's https address,
the CA and a token file, and models, infer and batch go through it over TLS."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner, Result

from tensorway.cli.contexts import LOCAL_CONTEXT, save_local_context
from tensorway.cli.main import app
from tensorway.edge.config import load_values
from tests.edge_mesh import Edge

TENSORWAY = Path(sys.executable).parent / "tensorway"


class Cli:
    """The CLI with its own config file, as a user on another machine would have it."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.env = {"TENSORWAY_CONFIG": str(config), "TENSORWAY_CONTEXT": ""}

    def __call__(self, *args: str) -> Result:
        return CliRunner().invoke(app, list(args), env=self.env, catch_exceptions=False)

    def json(self, *args: str) -> Any:
        result = self(*args, "-o", "json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


@pytest.fixture
def cli(edge: Edge, tmp_path: Path) -> Cli:
    """A config whose current context is the edge mesh, with a tenant's token in a file."""
    token = tmp_path / "token"
    token.write_text(edge.token("cli-remote") + "\n")
    cli = Cli(tmp_path / "config" / "config.yaml")
    made = cli(
        "config",
        "set-context",
        "edge",
        "--endpoint",
        edge.url,
        "--token-file",
        str(token),
        "--ca",
        str(edge.ca),
    )
    assert made.exit_code == 0, made.output
    assert cli("config", "use-context", "edge").exit_code == 0
    return cli


def test_contexts_are_kept_in_the_config_file(cli: Cli, edge: Edge) -> None:
    assert cli("config", "current-context").stdout == "edge\n"
    listed = cli.json("config", "get-contexts")
    assert listed["current-context"] == "edge"
    assert listed["contexts"]["edge"]["endpoint"] == edge.url
    assert listed["contexts"]["edge"]["ca"] == str(edge.ca)
    assert yaml.safe_load(cli.config.read_text()) == listed
    # The table shows the whole endpoint even in a narrow terminal's worth of columns.
    table = CliRunner().invoke(app, ["config", "get-contexts"], env={**cli.env, "COLUMNS": "40"})
    assert edge.url in table.stdout


def test_models_and_infer_through_envoy(cli: Cli) -> None:
    listed = cli.json("models", "list")
    assert {"models/simple", "models/digits"} <= {model["name"] for model in listed["models"]}
    shown = cli.json("models", "show", "simple")
    assert shown["model"]["name"] == "models/simple"
    assert shown["route"] is not None

    inputs = ["-i", f"INPUT0={json.dumps([list(range(16))])}", "-i", f"INPUT1={json.dumps([[3] * 16])}"]
    answer = cli.json("infer", "simple", *inputs)
    outputs = {tensor["name"]: tensor["contents"]["int_contents"] for tensor in answer["outputs"]}
    assert outputs == {"OUTPUT0": [i + 3 for i in range(16)], "OUTPUT1": [i - 3 for i in range(16)]}
    table = cli("infer", "simple", *inputs)
    assert table.exit_code == 0, table.output
    assert "OUTPUT0" in table.stdout


def test_refusals_are_client_errors_with_their_reason(cli: Cli) -> None:
    # A tenant's token may read the registry, not write it.
    refused = cli(
        "models", "register", "cli-remote-model", "--artifact-uri", "s3://models/x/1",
        "--input-spec", "input:FP32:4", "--output-spec", "label:INT64:1",
    )  # fmt: skip
    assert refused.exit_code == 2, refused.output
    assert "PERMISSION_DENIED" in refused.stderr
    missing = cli("infer", "no-such-model", "-i", "x=[1]")
    assert missing.exit_code == 2
    assert "NOT_FOUND" in missing.stderr


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused while it is held."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def test_an_unreachable_mesh_is_unavailable(cli: Cli, edge: Edge, closed_port: int) -> None:
    endpoint = f"https://127.0.0.1:{closed_port}"
    assert cli("config", "set-context", "gone", "--endpoint", endpoint, "--ca", str(edge.ca)).exit_code == 0
    result = cli("--context", "gone", "models", "list")
    assert result.exit_code == 3, result.output
    assert "UNAVAILABLE" in result.stderr
    unknown = cli("--context", "nowhere", "models", "list")
    assert unknown.exit_code == 2
    assert "no context 'nowhere'" in unknown.stderr


def test_batch_job_through_envoy_piped_to_a_file(cli: Cli, tmp_path: Path) -> None:
    rows = np.random.default_rng(3).integers(0, 17, (120, 64)).astype(np.float32)
    source = tmp_path / "rows.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "inputs": {"input": row.tolist()}}) + "\n" for i, row in enumerate(rows))
    )
    out = tmp_path / "job.json"
    # As `tensorway batch submit ... --wait -o json > job.json` in a shell: stdout is a file.
    with out.open("wb") as stdout:
        finished = subprocess.run(
            [str(TENSORWAY), "batch", "submit", str(source), "--model", "digits", "--wait", "-o", "json"],
            stdout=stdout,
            stderr=subprocess.PIPE,
            env={**os.environ, **cli.env},
            timeout=120,
            check=False,
        )
    assert finished.returncode == 0, finished.stderr.decode()
    job = json.loads(out.read_text())
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["progress"]["rows_done"] == "120"
    # The tenant is the token's.
    assert "/cli-remote/" in job["input_uri"]

    stored = [*job["results"], *([job["errors"]] if "errors" in job else []), job["manifest"]]
    ids = []
    for item in stored:
        with urllib.request.urlopen(item["presigned_url"], timeout=30) as response:
            data = response.read()
        if item.get("sha256"):
            assert hashlib.sha256(data).hexdigest() == item["sha256"]
        if item in job["results"]:
            ids += [json.loads(line)["id"] for line in data.decode().splitlines()]
    assert sorted(ids) == list(range(120))

    status = cli.json("batch", "status", job["name"])
    assert status["name"] == job["name"]
    assert job["name"] in {j["name"] for j in cli.json("batch", "list")["jobs"]}


def test_the_local_context_mints_an_admin_token_for_each_command(edge: Edge, tmp_path: Path) -> None:
    cli = Cli(tmp_path / "config.yaml")
    jwt = load_values("local")["jwt"]
    # What `tensorway dev up` writes for its stack: no token stored, the signing key's path instead.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TENSORWAY_CONFIG", str(cli.config))
        save_local_context(
            edge.url, edge.ca, edge.private_key, issuer=jwt["issuer"], audience=jwt["audiences"][0]
        )
    assert cli("config", "current-context").stdout == f"{LOCAL_CONTEXT}\n"
    model = f"cli-local-{uuid.uuid4().hex[:8]}"
    registered = cli.json(
        "models", "register", model, "--artifact-uri", f"s3://models/{model}/1",
        "--input-spec", "input:FP32:4", "--output-spec", "label:INT64:1",
    )  # fmt: skip
    assert registered["name"] == f"models/{model}/versions/1"
    assert f"models/{model}" in {m["name"] for m in cli.json("models", "list")["models"]}
