"""The Dockerfile builds a pinned, non-root image for every service, and the scripts it ships
for docker-compose do what they say."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from types import ModuleType

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .manifests import DOCKERFILE, ROOT

STAGE = re.compile(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE | re.MULTILINE)
ARG = re.compile(r"^ARG\s+(\w+)=(\S+)", re.MULTILINE)


def stages() -> dict[str, str]:
    """Stage name → the text of that stage."""
    text = DOCKERFILE.read_text()
    matches = list(STAGE.finditer(text))
    return {
        m.group(2): text[m.start() : matches[i + 1].start() if i + 1 < len(matches) else len(text)]
        for i, m in enumerate(matches)
    }


def test_bases_are_pinned_to_exact_releases() -> None:
    bases = {name: value for name, value in ARG.findall(DOCKERFILE.read_text()) if name.endswith("_IMAGE")}
    assert set(bases) >= {"PYTHON_IMAGE", "TRITON_IMAGE", "ENVOY_IMAGE"}
    for name, image in bases.items():
        tag = image.split("@", 1)[0].rsplit(":", 1)[-1]
        assert re.search(r"\d+\.\d+", tag), f"{name}={image} is not an exact release"
    assert bases["PYTHON_IMAGE"].startswith("python:3.11.")


def test_the_default_target_is_the_non_root_runtime() -> None:
    runtime = list(stages().items())[-1]
    assert runtime[0] == "runtime", "the last stage is what `docker build .` produces"
    user = re.findall(r"^USER\s+(\S+)", runtime[1], re.MULTILINE)
    assert user == ["10001:10001"]
    assert re.search(r'^ENTRYPOINT \["tensorway"\]', runtime[1], re.MULTILINE)
    # No compiler or build tooling: the venv comes built from the build stage.
    assert "apt-get" not in runtime[1]
    assert "pip install" not in runtime[1]


def test_triton_runs_as_a_non_root_user() -> None:
    assert re.findall(r"^USER\s+(\S+)", stages()["triton-demo"], re.MULTILINE) == ["1000:1000"]


def test_demo_model_requirements_are_the_local_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = re.findall(r'"([^"]+)"', "".join(re.findall(r"pip install (.*)", stages()["demo-models"])))
    wanted += re.findall(r'"([^"]+)"', "".join(re.findall(r"pip install (.*)", stages()["triton-demo"])))
    assert wanted
    assert set(wanted) <= set(extras["local"])


def test_every_copied_file_is_in_the_build_context() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for sources in re.findall(r"^COPY\s+(?!--from)(.*)$", DOCKERFILE.read_text(), re.MULTILINE):
        *paths, _target = [part for part in sources.split() if not part.startswith("--")]
        for path in (p.rstrip("/") for p in paths):
            assert (ROOT / path).exists(), f"COPY {path}: missing"
            assert any(path == a or path.startswith(f"{a}/") for a in allowed), f"COPY {path}: .dockerignore"


@pytest.fixture(scope="module")
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def run_health_check(*args: str) -> int:
    script = ROOT / "docker" / "grpc_health_check.py"
    checked = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, timeout=30, check=False
    )
    return checked.returncode


def test_health_check_passes_only_while_serving(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_health_check(address) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_health_check(address) == 1
    assert run_health_check(address, "no.such.Service") == 1


def test_health_check_fails_without_a_server() -> None:
    # A port of the closed server range that nothing listens on: connection refused.
    assert run_health_check("127.0.0.1:1") == 1


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "docker" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_registration_addresses_the_compose_services() -> None:
    state = _load("register_demo_models").stack("registry:50052", "orchestrator:50053")
    assert state.addresses() == {"registry": "registry:50052", "orchestrator": "orchestrator:50053"}
