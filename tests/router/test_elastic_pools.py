"""Elastic pools with nothing faked: orchestrators (`tensorway serve orchestrator` processes) join a
pool that lists no endpoints, the real registry pushes its members to a real router over
WatchRoutes, and under steady load a third orchestrator joins and gets traffic, one killed
(SIGKILL) leaves within its lease, and one stopped gracefully leaves at once."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tensorway.devstack import DevStackSettings, Stack
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tests.ports import free_port
from tests.registry.conftest import RunningRegistry
from tests.registry.conftest import start_registry as start_real_registry
from tests.router.conftest import OrchestratorProcess, start_router
from tests.router.test_end_to_end import own_registry_store  # noqa: F401 - a fixture
from tests.router.test_router import assert_simple_answer, simple_request
from tests.waiting import eventually

POOL = "elastic"
MODEL = "simple"
WORKERS = 8
# Short leases keep the test quick; what they bound is the same at the 10 s default.
SHORT_LEASE = {"POOL_LEASE": "PT3S", "POOL_HEARTBEAT": "PT1S"}
# Longer than the test waits for a graceful stop to show: its member can only have left.
LONG_LEASE = {"POOL_LEASE": "PT120S", "POOL_HEARTBEAT": "PT1S"}


class PoolMember(OrchestratorProcess):
    """An orchestrator process that joins `pools/elastic` on the registry by itself, with its
    Prometheus metrics on a port of its own."""

    def __init__(self, triton: str, registry: str, lease: dict[str, str]) -> None:
        super().__init__(triton, [MODEL])
        self.metrics_port = free_port()
        prefix = "TENSORWAY_ORCHESTRATOR_"
        self._env.update(
            {
                f"{prefix}REGISTRY_ADDRESS": registry,
                f"{prefix}POOL": POOL,
                f"{prefix}METRICS_ENABLED": "true",
                f"{prefix}METRICS_PORT": str(self.metrics_port),
                **{prefix + key: value for key, value in lease.items()},
            }
        )

    def answered(self) -> float:
        """Requests for the model it answered OK, from its own metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "tensorway_orchestrator_request_seconds_count"
            and sample.labels == {"model": MODEL, "code": "OK"}
        )

    async def terminate(self) -> None:
        """SIGTERM: a graceful stop."""
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        await self._process.wait()
        self._process = None


@pytest.fixture(scope="module")
def own_triton() -> Iterator[str]:
    """A Triton of the module's own: orchestrators that follow the registry unload what their
    pool does not deploy, which must not be the session Triton's models."""
    state_dir = Path(tempfile.mkdtemp(prefix="tensorway-elastic-triton-"))
    stack = Stack(
        DevStackSettings(state_dir=state_dir).without_pinned_ports(),
        state_dir=state_dir,
        die_with_parent=True,
    )
    try:
        yield stack.ensure(["triton"]).endpoints()["triton_grpc"].address
    finally:
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
async def registry(own_registry_store: tuple[str, str]) -> AsyncIterator[RunningRegistry]:  # noqa: F811
    postgres_url, redis_url = own_registry_store
    running = await start_real_registry(
        postgres_url, redis_url, pool_member_sweep_interval=timedelta(seconds=0.2)
    )
    yield running
    await running.stop()


async def deploy_on_elastic_pool(registry: RunningRegistry, signature: registry_pb.VersionRoute) -> None:
    stub = registry.stub
    await stub.CreatePool(registry_pb.CreatePoolRequest(pool=registry_pb.Pool(name=f"pools/{POOL}")))
    await stub.CreateModel(registry_pb.CreateModelRequest(model=registry_pb.Model(name=f"models/{MODEL}")))
    version = registry_pb.ModelVersion(
        platform=signature.platform,
        inputs=signature.inputs,
        outputs=signature.outputs,
        max_batch_size=signature.max_batch_size,
        artifact_uri=f"file://demo-models/{MODEL}/1",
    )
    await stub.CreateModelVersion(
        registry_pb.CreateModelVersionRequest(
            parent=f"models/{MODEL}", model_version_id="1", model_version=version
        )
    )
    await stub.CreateDeployment(
        registry_pb.CreateDeploymentRequest(
            parent=f"models/{MODEL}",
            deployment_id="main",
            deployment=registry_pb.Deployment(
                pool=f"pools/{POOL}", traffic=[registry_pb.TrafficSplit(version="1", weight=100)]
            ),
        )
    )


async def routed_endpoints(registry: RunningRegistry) -> set[str]:
    resolved = await registry.stub.ResolveModel(registry_pb.ResolveModelRequest(name=f"models/{MODEL}"))
    return {endpoint for version in resolved.route.versions for endpoint in version.endpoints}


def router_knows(endpoint: str) -> bool:
    """Whether the router in this process still keeps a channel to `endpoint`: its breaker's
    gauge goes when no route lists the endpoint any more."""
    return REGISTRY.get_sample_value("tensorway_router_breaker_open", {"endpoint": endpoint}) is not None


class SteadyLoad:
    """Workers sending `simple` through the router back to back, recording each outcome."""

    def __init__(self, router: str) -> None:
        self._channel = grpc.aio.insecure_channel(router)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self.outcomes: list[grpc.StatusCode] = []
        self._workers: list[asyncio.Task[None]] = []

    async def _work(self) -> None:
        while True:
            try:
                assert_simple_answer(await self._stub.Infer(simple_request(), timeout=5))
                self.outcomes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                self.outcomes.append(error.code())

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]

    def answered_since(self, mark: int) -> int:
        return sum(code is grpc.StatusCode.OK for code in self.outcomes[mark:])

    def failed_since(self, mark: int) -> list[grpc.StatusCode]:
        return [code for code in self.outcomes[mark:] if code is not grpc.StatusCode.OK]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._channel.close()


async def test_orchestrators_join_get_traffic_and_leave_when_killed_or_stopped(
    registry: RunningRegistry,
    own_triton: str,
    demo_signatures: dict[str, registry_pb.VersionRoute],
) -> None:
    await deploy_on_elastic_pool(registry, demo_signatures[MODEL])
    killed = PoolMember(own_triton, registry.address, SHORT_LEASE)
    stopped = PoolMember(own_triton, registry.address, LONG_LEASE)
    joiner = PoolMember(own_triton, registry.address, SHORT_LEASE)
    members = (killed, stopped, joiner)
    await asyncio.gather(killed.start(), stopped.start())
    router = await start_router(registry.address)
    load = SteadyLoad(router.address)
    try:

        async def first_two_routed() -> bool:
            return await routed_endpoints(registry) == {killed.address, stopped.address}

        await eventually(first_two_routed, what="the first two orchestrators in the pool's route")
        load.start()
        await eventually(lambda: load.answered_since(0) >= 50, what="the router answering")

        # A third orchestrator started mid-test joins and gets traffic.
        await joiner.start()

        async def joined() -> bool:
            return joiner.address in await routed_endpoints(registry)

        await eventually(joined, what="the third orchestrator in the pool's route")
        await eventually(lambda: joiner.answered() >= 20, what="the third orchestrator answering requests")

        # SIGKILL: it leaves once its lease runs out, and no request fails after it left.
        await killed.kill()

        async def killed_left() -> bool:
            return killed.address not in await routed_endpoints(registry) and not router_knows(killed.address)

        await eventually(
            killed_left, within=60, what="the killed orchestrator out of the pool and the router"
        )
        after_kill = len(load.outcomes)
        await eventually(lambda: load.answered_since(after_kill) >= 200, what="answers after it left")
        assert load.failed_since(after_kill) == []

        # SIGTERM: it leaves at once (its lease would keep it for two minutes, longer than
        # `eventually` waits), then stops.
        stopping = asyncio.create_task(stopped.terminate())

        async def stopped_left() -> bool:
            return stopped.address not in await routed_endpoints(registry)

        await eventually(stopped_left, what="the stopped orchestrator out of the pool")
        await stopping
        await eventually(lambda: not router_knows(stopped.address), what="the router dropping it")
        after_stop = len(load.outcomes)
        await eventually(lambda: load.answered_since(after_stop) >= 200, what="answers after it stopped")
        assert load.failed_since(after_stop) == []
        assert await routed_endpoints(registry) == {joiner.address}
    finally:
        await load.stop()
        await router.server.stop()
        for member in members:
            await member.kill()


async def test_an_orchestrator_whose_membership_lapsed_joins_again_with_its_states(
    registry: RunningRegistry,
    own_triton: str,
    demo_signatures: dict[str, registry_pb.VersionRoute],
) -> None:
    """The registry drops a member and what it reported when its lease runs out, as when the
    registry itself was out of reach for longer than the lease; the orchestrator's next heartbeat
    joins anew and reports its models' states again, so the pool's routes send it traffic again
    rather than leave its peer alone. An admin's LeavePool drops the same rows, at a known time."""
    await deploy_on_elastic_pool(registry, demo_signatures[MODEL])
    dropped = PoolMember(own_triton, registry.address, SHORT_LEASE)
    peer = PoolMember(own_triton, registry.address, SHORT_LEASE)
    await asyncio.gather(dropped.start(), peer.start())
    try:

        async def both_routed() -> bool:
            return await routed_endpoints(registry) == {dropped.address, peer.address}

        await eventually(both_routed, what="both orchestrators in the pool's route")
        await registry.stub.LeavePool(
            registry_pb.LeavePoolRequest(pool=f"pools/{POOL}", endpoint=dropped.address)
        )
        assert await routed_endpoints(registry) == {peer.address}
        await eventually(both_routed, what="the dropped orchestrator back in the route, ready")
        resolved = await registry.stub.ResolveModel(registry_pb.ResolveModelRequest(name=f"models/{MODEL}"))
        (version,) = resolved.route.versions
        reporters = {triton.endpoint for triton in version.readiness.tritons}
        assert dropped.address in reporters, version.readiness
    finally:
        for member in (dropped, peer):
            await member.kill()
