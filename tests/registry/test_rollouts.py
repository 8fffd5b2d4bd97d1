"""Measured rollouts through real servers: the registry (on the session's PostgreSQL and Redis)
drives them, a router in this process serves a steady client load and reports what each
version answered, and an orchestrator forwards each version to a model of the session's Triton:
version 1 to ``simple``, version 2 to ``simple`` (healthy) or to ``flaky``, which fails every
fifth request. Tests wait for the rollout's state, never for time; the intervals are short
because they are a parameter, not because the tests measure them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service

from tensorway.common.v1 import tensor_pb2
from tensorway.demo_models._config import ModelConfig, TensorConfig
from tensorway.devstack import Stack
from tensorway.registry.v1 import registry_service_pb2 as pb
from tests.registry.conftest import RunningRegistry, Stub, failure, start_registry, unique
from tests.router.conftest import FakeOrchestrator, Running, start_orchestrator, start_router
from tests.waiting import eventually

RUNNING = pb.ROLLOUT_STATE_RUNNING
PAUSED = pb.ROLLOUT_STATE_PAUSED
SUCCEEDED = pb.ROLLOUT_STATE_SUCCEEDED
ROLLED_BACK = pb.ROLLOUT_STATE_ROLLED_BACK
ABORTED = pb.ROLLOUT_STATE_ABORTED
# A guard against a hang on a loaded machine, not a measurement.
PATIENCE = 120
FAST = {"rollout_tick": 0.05}


@pytest.fixture(scope="module")
async def flaky_triton(triton_grpc: str, dev_stack: Stack) -> str:
    """The session's Triton with the ``flaky`` model loaded beside the demo models."""
    repository = Path(dev_stack.ensure(["triton"]).components["triton"].internal["model_repository"])
    tensor = TensorConfig
    config = ModelConfig(
        name="flaky",
        max_batch_size=8,
        inputs=(tensor("INPUT0", "INT32", (16,)), tensor("INPUT1", "INT32", (16,))),
        outputs=(tensor("OUTPUT0", "INT32", (16,)), tensor("OUTPUT1", "INT32", (16,))),
    )
    (repository / "flaky" / "1").mkdir(parents=True, exist_ok=True)
    (repository / "flaky" / "config.pbtxt").write_text(config.to_pbtxt())
    source = resources.files("tensorway.demo_models") / "flaky_model.py"
    (repository / "flaky" / "1" / "model.py").write_bytes(source.read_bytes())
    async with grpc.aio.insecure_channel(triton_grpc) as channel:
        await triton_service.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
            triton.RepositoryModelLoadRequest(model_name="flaky"), timeout=PATIENCE
        )
    return triton_grpc


@dataclass
class VersionedOrchestrator(FakeOrchestrator):
    """Runs each registry version on the Triton model `models` names for it."""

    models: dict[str, str] = field(default_factory=dict)

    async def _triton_answer(self, upstream: Any) -> Any:
        upstream.model_name = self.models[upstream.model_version]
        return await super()._triton_answer(upstream)


@dataclass
class Mesh:
    registry: RunningRegistry
    router: Running
    orchestrator: VersionedOrchestrator
    model: str
    answers: Counter[str] = field(default_factory=Counter)

    @property
    def stub(self) -> Stub:
        return self.registry.stub

    async def traffic(self) -> dict[str, int]:
        deployment = await self.stub.GetDeployment(
            pb.GetDeploymentRequest(name=f"models/{self.model}/deployments/main")
        )
        return {split.version: split.weight for split in deployment.deployment.traffic}

    async def start(self, version_2: str = "simple", **rollout: Any) -> pb.Rollout:
        self.orchestrator.models["2"] = version_2
        interval = duration_pb2.Duration()
        interval.FromMilliseconds(int(rollout.pop("interval", 1) * 1000))
        started = await self.stub.StartRollout(
            pb.StartRolloutRequest(
                parent=f"models/{self.model}",
                rollout=pb.Rollout(interval=interval, **{"to_version": "2", **rollout}),
            )
        )
        return started.rollout

    async def rollout(self, name: str) -> pb.Rollout:
        return (await self.stub.GetRollout(pb.GetRolloutRequest(name=name))).rollout

    async def ended(self, name: str) -> pb.Rollout:
        async def done() -> pb.Rollout | None:
            found = await self.rollout(name)
            return found if found.state not in (RUNNING, PAUSED) else None

        return await eventually(done, within=PATIENCE, what=f"rollout {name} ends")


async def _load(router: str, model: str, answers: Counter[str]) -> None:
    """A steady client: Triton ModelInfer requests through the router, one after another."""
    values = np.arange(16, dtype="<i4").reshape(1, 16)
    request = triton.ModelInferRequest(model_name=model)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(values.tobytes())
    async with grpc.aio.insecure_channel(router) as channel:
        stub = triton_service.GRPCInferenceServiceStub(channel)
        while True:
            try:
                answer = await stub.ModelInfer(request, timeout=10)
                answers[answer.model_version] += 1
            except grpc.aio.AioRpcError as error:
                answers[error.code().name] += 1


async def _model(stub: Stub, endpoint: str) -> str:
    model, pool = unique("rollout"), unique("pool")
    await stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=f"models/{model}")))
    for _ in range(2):
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=f"models/{model}",
                model_version=pb.ModelVersion(
                    platform="python",
                    artifact_uri="s3://models/simple",
                    max_batch_size=8,
                    inputs=[
                        tensor_pb2.TensorSpec(name=n, datatype="INT32", shape=[16])
                        for n in ("INPUT0", "INPUT1")
                    ],
                    outputs=[
                        tensor_pb2.TensorSpec(name=n, datatype="INT32", shape=[16])
                        for n in ("OUTPUT0", "OUTPUT1")
                    ],
                ),
            )
        )
    await stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name=f"pools/{pool}", endpoints=[endpoint])))
    await stub.CreateDeployment(
        pb.CreateDeploymentRequest(
            parent=f"models/{model}",
            deployment_id="main",
            deployment=pb.Deployment(
                pool=f"pools/{pool}", traffic=[pb.TrafficSplit(version="1", weight=100)]
            ),
        )
    )
    return model


@pytest.fixture
async def mesh(postgres_url: str, redis_url: str, flaky_triton: str) -> AsyncIterator[Mesh]:
    registry = await start_registry(postgres_url, redis_url, **FAST)
    orchestrator = VersionedOrchestrator(flaky_triton, models={"1": "simple", "2": "simple"})
    serving = await start_orchestrator(orchestrator)
    model = await _model(registry.stub, serving.address)
    router = await start_router(registry.address, traffic_report_interval=0.05)
    mesh = Mesh(registry, router, orchestrator, model)
    load = asyncio.create_task(_load(router.address, model, mesh.answers))
    try:
        yield mesh
    finally:
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
        await router.server.stop()
        await serving.server.stop()
        await registry.stop()


async def test_a_healthy_version_is_rolled_out_to_all_of_the_traffic(mesh: Mesh) -> None:
    started = await mesh.start(
        steps=[20, 50, 100], bounds=pb.RolloutBounds(min_requests=20, max_p99_ratio=100)
    )
    assert started.state == RUNNING
    assert started.step_index == 0
    assert await mesh.traffic() == {"1": 80, "2": 20}

    ended = await mesh.ended(started.name)

    assert ended.state == SUCCEEDED, ended.reason
    assert ended.step_index == 2
    assert await mesh.traffic() == {"1": 0, "2": 100}
    # The last step judged saw version 2 answer, without server errors.
    assert ended.to_figures.requests >= 20
    assert ended.to_figures.server_errors == 0
    assert "2" in mesh.orchestrator.versions, "version 2 ran clients' requests"


async def test_a_version_failing_one_request_in_five_is_rolled_back_within_one_step(mesh: Mesh) -> None:
    started = await mesh.start("flaky", steps=[50, 100], bounds=pb.RolloutBounds(min_requests=20))

    ended = await mesh.ended(started.name)

    assert ended.state == ROLLED_BACK
    assert ended.step_index == 0, "rolled back at its first step"
    assert "version 2 failed" in ended.reason, ended.reason
    assert "version 1" in ended.reason, ended.reason
    assert ended.to_figures.server_errors * 5 >= ended.to_figures.requests - 5
    assert await mesh.traffic() == {"1": 100, "2": 0}
    listed = await mesh.stub.ListRollouts(pb.ListRolloutsRequest(parent=f"models/{mesh.model}"))
    assert [r.name for r in listed.rollouts] == [started.name]


async def test_a_rollout_pauses_resumes_and_aborts(mesh: Mesh) -> None:
    # More answers than the test sends: the first step never passes by itself.
    started = await mesh.start(steps=[10, 100], bounds=pb.RolloutBounds(min_requests=10**9))
    paused = (await mesh.stub.PauseRollout(pb.PauseRolloutRequest(name=started.name))).rollout
    assert paused.state == PAUSED
    assert await mesh.traffic() == {"1": 90, "2": 10}
    refused = await failure(mesh.stub.PauseRollout(pb.PauseRolloutRequest(name=started.name)))
    assert refused.code is grpc.StatusCode.FAILED_PRECONDITION

    resumed = (await mesh.stub.ResumeRollout(pb.ResumeRolloutRequest(name=started.name))).rollout
    assert resumed.state == RUNNING
    waiting = await eventually(
        lambda: _with_reason(mesh, started.name), within=PATIENCE, what="the step waits for answers"
    )
    assert "waiting for 1000000000 answers of version 2" in waiting.reason

    second = await failure(mesh.start(steps=[50, 100]))
    assert second.code is grpc.StatusCode.FAILED_PRECONDITION, "one rollout per model at a time"

    aborted = (await mesh.stub.AbortRollout(pb.AbortRolloutRequest(name=started.name))).rollout
    assert aborted.state == ABORTED
    assert aborted.end_time.seconds > 0
    assert await mesh.traffic() == {"1": 100, "2": 0}
    again = await failure(mesh.stub.AbortRollout(pb.AbortRolloutRequest(name=started.name)))
    assert again.code is grpc.StatusCode.FAILED_PRECONDITION


async def _with_reason(mesh: Mesh, name: str) -> pb.Rollout | None:
    found = await mesh.rollout(name)
    return found if found.reason else None


async def test_another_registry_replica_takes_a_rollout_over_when_the_first_stops(
    mesh: Mesh, postgres_url: str, redis_url: str
) -> None:
    first = await start_registry(postgres_url, redis_url, **FAST)
    started = (
        await first.stub.StartRollout(
            pb.StartRolloutRequest(
                parent=f"models/{mesh.model}",
                rollout=pb.Rollout(
                    to_version="2",
                    steps=[50, 100],
                    interval=duration_pb2.Duration(seconds=1),
                    bounds=pb.RolloutBounds(min_requests=20, max_p99_ratio=100),
                ),
            )
        )
    ).rollout
    await first.stop()

    ended = await mesh.ended(started.name)

    assert ended.state == SUCCEEDED, ended.reason
    assert await mesh.traffic() == {"1": 0, "2": 100}


async def test_rollouts_refuse_what_they_cannot_do(mesh: Mesh) -> None:
    unknown = await failure(mesh.start(steps=[50, 100], to_version="9"))
    assert unknown.code is grpc.StatusCode.NOT_FOUND
    falling = await failure(mesh.start(steps=[50, 20, 100]))
    assert falling.code is grpc.StatusCode.INVALID_ARGUMENT
    assert falling.violations == [("rollout.steps", "rising")]
    assert await mesh.traffic() == {"1": 100}
    listed = await mesh.stub.ListRollouts(pb.ListRolloutsRequest(parent=f"models/{mesh.model}"))
    assert not listed.rollouts
