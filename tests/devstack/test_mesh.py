"""The whole local mesh as `tensorway dev up` starts it: every tensorway service answers
health and reflection, the demo models register, and a request crosses router, orchestrator
and Triton."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorway.devstack import (
    ROUTED_DEMO_MODELS,
    DevStackSettings,
    Stack,
    StackState,
    default_components,
    demo_request,
    register_demo_models,
    up_with_demo_models,
)
from tensorway.devstack._process import is_alive
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc

SERVICES = {
    "registry": "tensorway.registry.v1.RegistryService",
    "orchestrator": "tensorway.inference.v1.InferenceService",
    "router": "inference.GRPCInferenceService",
}


@pytest.fixture
def mesh(private_state_dir: Path) -> Iterator[tuple[Stack, StackState]]:
    stack = Stack(
        DevStackSettings(state_dir=private_state_dir).without_pinned_ports(),
        state_dir=private_state_dir,
        die_with_parent=True,
    )
    try:
        yield stack, stack.up(["router"])
    finally:
        stack.down()


async def test_every_service_answers_health_and_reflection(mesh: tuple[Stack, StackState]) -> None:
    _, state = mesh
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert grpcurl is not None
    for name, service in SERVICES.items():
        address = state.addresses()[name]
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        process = await asyncio.create_subprocess_exec(
            grpcurl, "-plaintext", address, "list", stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout=30)
        assert service in stdout.decode().split(), name


def test_demo_models_register_and_answer_through_the_router(mesh: tuple[Stack, StackState]) -> None:
    stack, state = mesh
    assert register_demo_models(state) == list(ROUTED_DEMO_MODELS)
    # Registering again (a second `dev up` on the same data) changes nothing and still works.
    register_demo_models(state)
    # Each demo version came from its artifact in the stack's S3, and its pool made it ready.
    with grpc.insecure_channel(state.addresses()["registry"]) as channel:
        registry = registry_grpc.RegistryServiceStub(channel)
        for model in ("simple", "digits", "accumulate"):
            version = registry.GetModelVersion(
                registry_pb.GetModelVersionRequest(name=f"models/{model}/versions/1"), timeout=10
            ).model_version
            assert version.artifact_uri.startswith(f"s3://tensorway-models/{model}/"), model
            deployment = registry.GetDeployment(
                registry_pb.GetDeploymentRequest(name=f"models/{model}/deployments/local"), timeout=10
            ).deployment
            assert [r.state for r in deployment.readiness] == [registry_pb.MODEL_VERSION_STATE_READY], model
    repository = Path(state.components["triton"].internal["model_repository"])
    assert (repository / "digits" / "1" / ".tensorway-artifact.json").is_file()
    sums, differences = demo_request(state.addresses()["router"])
    assert sums == list(range(1, 17))
    assert differences == list(range(-1, 15))

    # Triton's own client, pointed at the router, sees the same model as on Triton itself.
    client = triton.InferenceServerClient(state.addresses()["router"])
    pixels = np.random.default_rng(7).uniform(0, 16, size=(3, 64)).astype(np.float32)
    request = triton.InferInput("input", [3, 64], "FP32")
    request.set_data_from_numpy(pixels)
    routed = client.infer("digits", [request]).as_numpy("probabilities")
    direct = triton.InferenceServerClient(state.addresses()["triton_grpc"]).infer("digits", [request])
    np.testing.assert_allclose(routed, direct.as_numpy("probabilities"), rtol=1e-6)

    records = list(stack.status().components.values())
    stack.down()
    assert not any(is_alive(record.identity) for record in records)


def test_dev_up_loads_each_demo_model_once_from_its_artifact(private_state_dir: Path) -> None:
    """As `tensorway dev up` starts the stack: Triton starts with no model loaded, and the
    orchestrator loads each registered demo version once, from its artifact in S3."""
    stack = Stack(
        DevStackSettings(state_dir=private_state_dir).without_pinned_ports(),
        state_dir=private_state_dir,
        components=default_components(models_from_registry=True),
        die_with_parent=True,
    )
    try:
        state, models = up_with_demo_models(stack, ["router"])
        assert models == list(ROUTED_DEMO_MODELS)
        # Ready on the pool when it returns: the first request answers.
        sums, _ = demo_request(state.addresses()["router"])
        assert sums == list(range(1, 17))
        index = triton.InferenceServerClient(state.addresses()["triton_grpc"]).get_model_repository_index()
        assert {model.name for model in index.models if model.state == "READY"} == set(ROUTED_DEMO_MODELS)
        triton_log = (private_state_dir / state.components["triton"].log).read_text()
        assert sorted(re.findall(r"successfully loaded '([^']+)'", triton_log)) == sorted(ROUTED_DEMO_MODELS)
    finally:
        stack.down()
