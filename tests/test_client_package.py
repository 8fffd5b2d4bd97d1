"""The client package: gen/ builds as `tensorway-contracts`, alone, and its stubs import in a fresh
environment that has no server code."""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tensorway import protogen

ROOT = protogen.project_root()
GEN = ROOT / "gen"


def _run(*argv: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(arg) for arg in argv], capture_output=True, text=True, timeout=300, check=False, cwd=cwd
    )
    assert result.returncode == 0, f"{argv}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _generated_files() -> set[str]:
    return {
        str(path.relative_to(GEN))
        for path in (GEN / "tensorway").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's wheel, built from a copy of gen/ (setuptools builds in its source tree) with
    this environment's setuptools, offline."""
    scratch = tmp_path_factory.mktemp("contracts")
    source = scratch / "gen"
    shutil.copytree(GEN, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    wheels = scratch / "wheels"
    _run(
        sys.executable,
        *("-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"),
        *("--wheel-dir", wheels, source),
    )
    (built,) = wheels.glob("tensorway_contracts-*.whl")
    return built


def test_the_wheel_holds_every_generated_module_and_nothing_else(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = email.message_from_bytes(
            archive.read(next(name for name in names if name.endswith(".dist-info/METADATA")))
        )
    shipped = {name for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert shipped == _generated_files()
    assert {name for name in shipped if name.endswith("py.typed")}, "typed for a client's type checker"
    assert metadata["Name"] == "tensorway-contracts"
    requirements = {re.split(r"[<>=!~ ;\[]", line)[0] for line in metadata.get_all("Requires-Dist")}
    assert requirements == {"grpcio", "protobuf", "googleapis-common-protos"}


def test_the_dependencies_admit_no_runtime_older_than_the_generated_code_checks_for() -> None:
    dependencies = tomllib.loads((GEN / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.fullmatch(r"([\w-]+)>=([\d.]+),.*", dependency).groups() for dependency in dependencies)
    stub = (GEN / "tensorway/inference/v1/inference_service_pb2_grpc.py").read_text()
    grpc_generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", stub)
    messages = (GEN / "tensorway/inference/v1/inference_service_pb2.py").read_text()
    protobuf_generated = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
        messages,
    )
    assert grpc_generated is not None
    assert protobuf_generated is not None
    assert floors["grpcio"] == grpc_generated.group(1)
    assert floors["protobuf"] == ".".join(protobuf_generated.groups())


def test_a_fresh_environment_installs_it_and_calls_a_stub(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "client"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)
    # The dependencies come from this environment, as installed (offline): a path file adds its
    # site-packages to the client's path, after the client's own, and runs none of the path files
    # in it, so the server's editable install (services/ and gen/ on the path) stays out.
    client_site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    (client_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = """
import importlib.util, grpc
from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as inference
from tensorway.inference.v1 import inference_service_pb2_grpc as inference_grpc
from tensorway.registry.v1 import registry_service_pb2_grpc
from tensorway.batch.v1 import batch_service_pb2_grpc
assert inference.__file__.startswith(__import__("sys").prefix), inference.__file__
assert importlib.util.find_spec("tensorway.router") is None, "no server code"
tensor = tensor_pb2.Tensor(name="INPUT0", datatype="INT32", shape=[1, 16])
request = inference.InferRequest(model_name="simple", inputs=[tensor])
with grpc.insecure_channel("127.0.0.1:9") as channel:
    stub = inference_grpc.InferenceServiceStub(channel)
    try:
        stub.Infer(request, timeout=2)
    except grpc.RpcError as error:
        print(error.code().name)
"""
    assert _run(python, "-c", script).strip() == "UNAVAILABLE"
