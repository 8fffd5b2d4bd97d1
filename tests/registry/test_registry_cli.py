"""`tensorway models` against a real registry: each command, and how failures read."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml
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
        "--input-spec",
        "input:FP32:64",
        "--output-spec",
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
        "--input-spec",
        "x:FLOAT:4",
        "--output-spec",
        "y:FP32:0",
    )
    assert bad.exit_code == 2  # a client error
    assert "INVALID_ARGUMENT" in bad.output
    assert "model_version.inputs[0].datatype" in bad.output
    assert "model_version.outputs[0].shape" in bad.output
    missing = await tensorway(registry, "show", unique("absent"))
    assert missing.exit_code == 2
    assert "NOT_FOUND" in missing.output
    weights = await tensorway(registry, "traffic", model, "1=abc")
    assert weights.exit_code == 2


def test_an_address_or_a_context_is_required(tmp_path: Path) -> None:
    env = {"TENSORWAY_REGISTRY_ADDRESS": "", "TENSORWAY_CONFIG": str(tmp_path / "none.yaml")}
    result = CliRunner().invoke(app, ["models", "list"], env=env)
    assert result.exit_code == 2
    assert "TENSORWAY_REGISTRY_ADDRESS" in result.output
    assert "tensorway config set-context" in result.output


async def test_every_command_prints_protobuf_json(registry: RunningRegistry) -> None:
    model, pool = unique("cli-json"), unique("pool")

    async def as_json(*args: str) -> Any:
        result = await tensorway(registry, *args, "-o", "json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    spec = [
        "--artifact-uri",
        f"s3://models/{model}/1",
        "--input-spec",
        "input:FP32:64",
        "--output-spec",
        "label:INT64:1",
    ]
    registered = await as_json("register", model, *spec, "--label", "team=cli-json")
    assert registered["name"] == f"models/{model}/versions/1"
    assert registered["stage"] == "STAGE_DRAFT"
    assert registered["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["64"]}]
    await as_json("register", model, *spec)
    deployed = await as_json(
        "deploy", model, "--version", "1", "--pool", pool, "--endpoint", "127.1.1.2:9000", "--alias", "best=1"
    )
    assert deployed["traffic"] == [{"version": "1", "weight": 100}]
    assert deployed["aliases"] == {"best": "1"}
    promoted = await as_json("promote", model, "1")
    assert promoted["model_version"]["stage"] == "STAGE_STAGING"
    split = await as_json("traffic", model, "1=70", "2=30")
    assert split["traffic"] == [{"version": "1", "weight": 70}, {"version": "2", "weight": 30}]
    listed = await as_json("list", "--filter", "team=cli-json")
    assert f"models/{model}" in [m["name"] for m in listed["models"]]
    shown = await as_json("show", model)
    assert shown["model"]["labels"] == {"team": "cli-json"}
    assert [v["name"].rsplit("/", 1)[1] for v in shown["model_versions"]] == ["1", "2"]
    assert shown["deployments"][0]["pool"] == f"pools/{pool}"
    assert shown["route"]["route"]["versions"][0]["endpoints"] == ["127.1.1.2:9000"]
    as_yaml = await tensorway(registry, "show", model, "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout) == shown


SIGNED_CONFIG = """
name: "anything"
backend: "python"
max_batch_size: 4
input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 8, -1 ] } ]
output [
  { name: "label" data_type: TYPE_INT64 dims: [ 1 ] },
  { name: "tag" data_type: TYPE_STRING dims: [ 1 ] }
]
"""


async def test_register_from_a_model_directory_uploads_it_and_reads_its_signature(
    registry: RunningRegistry, tmp_path: Path, s3_endpoint: str, s3_credentials: Any
) -> None:
    model = unique("from")
    directory = tmp_path / "my_model"
    (directory / "1" / "__pycache__").mkdir(parents=True)
    (directory / "config.pbtxt").write_text(SIGNED_CONFIG)
    (directory / "1" / "model.py").write_text("class TritonPythonModel: ...\n")
    (directory / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"not the model's")
    s3 = [
        "--s3-endpoint", s3_endpoint,
        "--s3-access-key", s3_credentials.access_key,
        "--s3-secret-key", s3_credentials.secret_key,
    ]  # fmt: skip
    registered = await tensorway(registry, "register", model, "--from", str(directory), *s3, "-o", "json")
    assert registered.exit_code == 0, registered.output
    version = json.loads(registered.output)
    assert version["platform"] == "python"
    assert version["max_batch_size"] == 4
    assert [(t["name"], t["datatype"], t["shape"]) for t in version["inputs"]] == [
        ("pixels", "FP32", ["8", "-1"])
    ]
    assert [(t["name"], t["datatype"]) for t in version["outputs"]] == [("label", "INT64"), ("tag", "BYTES")]
    uri = version["artifact_uri"]
    assert uri.startswith(f"s3://tensorway-models/{model}/")

    from tensorway.registry.model_directory import s3_client

    client = s3_client(s3_endpoint, s3_credentials.access_key, s3_credentials.secret_key)
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    stored = await asyncio.to_thread(
        lambda: sorted(
            o.object_name.removeprefix(prefix) for o in client.list_objects(bucket, prefix, recursive=True)
        )
    )
    assert stored == ["1/model.py", "config.pbtxt"]

    # The same directory again is the same artifact; a directory that is not one is refused.
    again = await tensorway(registry, "register", model, "--from", str(directory), *s3, "-o", "json")
    assert json.loads(again.output)["artifact_uri"] == uri
    refused = await tensorway(registry, "register", model, "--from", str(tmp_path), *s3)
    assert refused.exit_code != 0
    assert "config.pbtxt" in refused.output


async def test_show_lists_each_versions_readiness_with_its_reasons(registry: RunningRegistry) -> None:
    from tensorway.registry.v1 import registry_service_pb2 as pb

    from .conftest import deploy

    deployed = await deploy(registry.stub, versions=2, endpoints=("127.0.0.1:7001",))
    await registry.stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(
                name=f"models/{deployed.model}/deployments/main",
                traffic=[pb.TrafficSplit(version="1", weight=50), pb.TrafficSplit(version="2", weight=50)],
            ),
            update_mask={"paths": ["traffic"]},
        )
    )
    await registry.stub.ReportModelStates(
        pb.ReportModelStatesRequest(
            pool=f"pools/{deployed.pool}",
            endpoint="127.0.0.1:7001",
            states=[
                pb.ModelStateReport(
                    model=deployed.model, version="1", triton="t:1", state=pb.MODEL_VERSION_STATE_READY
                ),
                pb.ModelStateReport(
                    model=deployed.model,
                    version="2",
                    triton="t:1",
                    state=pb.MODEL_VERSION_STATE_FAILED,
                    reason="model.py raised: broken on purpose",
                ),
            ],
        )
    )
    shown = await tensorway(registry, "show", deployed.model)
    assert shown.exit_code == 0, shown.output
    assert "1: READY 1/1" in shown.output
    assert "2: FAILED 0/1 (model.py raised: broken on purpose)" in shown.output
    as_json = json.loads((await tensorway(registry, "show", deployed.model, "-o", "json")).output)
    states = {r["version"]: r["state"] for r in as_json["deployments"][0]["readiness"]}
    assert states == {"1": "MODEL_VERSION_STATE_READY", "2": "MODEL_VERSION_STATE_FAILED"}
