"""A model's lifecycle through real servers: an artifact in S3 is fetched into the Triton's
repository, loaded, warmed and reported ready before it gets traffic; a broken one never gets
any and ends FAILED with Triton's reason; a fetch that breaks half-way leaves nothing behind.

The registry, an orchestrator and a router run in the test's process, on the session's
PostgreSQL, Redis and S3 and a Triton of the module's own. A client loop through the router
records every failure, and the test waits for events (a route's state, the loop's answers),
never for time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2

from tensorway.common.v1 import tensor_pb2
from tensorway.devstack import DevStackSettings, S3Credentials, Stack, default_components
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.inference.v1 import inference_service_pb2_grpc as inference_grpc
from tensorway.orchestrator import Settings, create
from tensorway.orchestrator.artifacts import (
    ArtifactError,
    ArtifactUri,
    ListedObject,
    ModelRepository,
    S3Objects,
)
from tensorway.registry.model_directory import ModelDirectory, s3_client, version_from_config
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.runtime import ServiceServer
from tests.registry.conftest import RunningRegistry, Stub, start_registry
from tests.router.conftest import start_router

READY = registry_pb.MODEL_VERSION_STATE_READY
FAILED = registry_pb.MODEL_VERSION_STATE_FAILED
BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("broken on purpose")
"""
# A guard against a hang, not a measurement: every wait below ends on an event.
PATIENCE = 180


@dataclass(frozen=True)
class PrivateTriton:
    address: str
    repository: Path


@pytest.fixture(scope="module")
def private_triton() -> Iterator[PrivateTriton]:
    """A Triton of this module's own: the orchestrator under test loads and unloads its models,
    and strict readiness remembers a model that failed, so the session's Triton stays out of it."""
    state_dir = Path(tempfile.mkdtemp(prefix="tensorway-lifecycle-"))
    components = [component for component in default_components() if component.name == "triton"]
    stack = Stack(
        DevStackSettings(state_dir=state_dir).without_pinned_ports(),
        state_dir=state_dir,
        components=components,
        die_with_parent=True,
    )
    try:
        record = stack.up()
        triton = record.components["triton"]
        yield PrivateTriton(
            triton.endpoints["triton_grpc"].address, Path(triton.internal["model_repository"])
        )
    finally:
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def triton_repository(private_triton: PrivateTriton) -> Path:
    return private_triton.repository


@pytest.fixture
def s3(s3_endpoint: str, s3_credentials: S3Credentials) -> Any:
    return s3_client(s3_endpoint, s3_credentials.access_key, s3_credentials.secret_key)


def model_directory(source: Path, target: Path, model_py: str | None = None) -> ModelDirectory:
    """A copy of the Triton model directory `source`, with its model.py replaced if given."""
    shutil.copy(source / "config.pbtxt", target / "config.pbtxt")
    shutil.copytree(source / "1", target / "1", ignore=shutil.ignore_patterns(".*", "__pycache__"))
    if model_py is not None:
        (target / "1" / "model.py").write_text(model_py)
    return ModelDirectory.read(target)


@dataclass
class RouteWatch:
    """The registry's routes for one model, as WatchRoutes pushes them."""

    stub: Stub
    model: str
    route: registry_pb.Route | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def follow(self) -> None:
        async for update in self.stub.WatchRoutes(registry_pb.WatchRoutesRequest(models=[self.model])):
            for route in update.routes:
                async with self._changed:
                    self.route = route
                    self._changed.notify_all()

    def state(self, version: str) -> int | None:
        for routed in self.route.versions if self.route else ():
            if routed.version == version:
                return int(routed.state)
        return None

    async def until(self, version: str, state: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.state(version) == state)


@dataclass
class ClientLoop:
    """Infers `model` through the router, one request after another, recording every answer's
    version and every failure."""

    stub: inference_grpc.InferenceServiceStub
    model: str
    versions: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)
    _answered: asyncio.Condition = field(default_factory=asyncio.Condition)

    def request(self) -> inference_pb.InferRequest:
        first = np.arange(16, dtype=np.int32).reshape(1, 16)
        second = np.ones((1, 16), dtype=np.int32)
        return inference_pb.InferRequest(
            model_name=self.model,
            inputs=[
                tensor_pb2.Tensor(
                    name="INPUT0", datatype="INT32", shape=[1, 16], raw_contents=first.tobytes()
                ),
                tensor_pb2.Tensor(
                    name="INPUT1", datatype="INT32", shape=[1, 16], raw_contents=second.tobytes()
                ),
            ],
        )

    async def run(self) -> None:
        request = self.request()
        while True:
            try:
                answer = await self.stub.Infer(request, timeout=30)
            except grpc.aio.AioRpcError as error:
                self.failures.append((error.code(), error.details() or ""))
            else:
                self.versions[answer.model_version] += 1
            async with self._answered:
                self._answered.notify_all()

    async def until(self, done: Callable[[], bool]) -> None:
        async with self._answered:
            await self._answered.wait_for(done)


@dataclass
class Mesh:
    registry: RunningRegistry
    orchestrator: str
    router: str
    pool: str


@pytest.fixture
async def mesh(
    postgres_url: str,
    redis_url: str,
    private_triton: PrivateTriton,
    s3_endpoint: str,
    s3_credentials: S3Credentials,
) -> AsyncIterator[Mesh]:
    registry = await start_registry(postgres_url, redis_url)
    pool = f"lifecycle-{uuid.uuid4().hex[:8]}"
    servers: list[ServiceServer] = []
    try:
        server, port = await create(
            Settings(
                tritons=(private_triton.address,),
                pool=pool,
                registry_address=registry.address,
                model_repository=private_triton.repository,
                s3_endpoint=s3_endpoint,
                s3_access_key=s3_credentials.access_key,
                s3_secret_key=s3_credentials.secret_key,
                metrics_enabled=False,
                log_json=False,
            )
        )
        servers.append(server)
        await server.start()
        orchestrator = f"127.0.0.1:{port}"
        await registry.stub.CreatePool(
            registry_pb.CreatePoolRequest(
                pool=registry_pb.Pool(name=f"pools/{pool}", endpoints=[orchestrator])
            )
        )
        router = await start_router(registry.address)
        servers.append(router.server)
        yield Mesh(registry, orchestrator, router.address, pool)
    finally:
        for running in reversed(servers):
            await running.stop()
        await registry.stop()


async def register(stub: Stub, model: str, version: str, directory: ModelDirectory, s3: Any) -> None:
    body = version_from_config(directory.config_text)
    body.artifact_uri = await asyncio.to_thread(directory.upload, s3, model)
    await stub.CreateModelVersion(
        registry_pb.CreateModelVersionRequest(
            parent=f"models/{model}", model_version_id=version, model_version=body
        )
    )


async def route_traffic(stub: Stub, model: str, weights: dict[str, int]) -> None:
    deployment = registry_pb.Deployment(
        name=f"models/{model}/deployments/main",
        traffic=[
            registry_pb.TrafficSplit(version=version, weight=weight) for version, weight in weights.items()
        ],
    )
    await stub.UpdateDeployment(
        registry_pb.UpdateDeploymentRequest(
            deployment=deployment, update_mask=field_mask_pb2.FieldMask(paths=["traffic"])
        )
    )


async def test_versions_get_traffic_only_once_ready_and_a_broken_one_never(
    mesh: Mesh, triton_repository: Path, s3: Any, tmp_path: Path
) -> None:
    stub = mesh.registry.stub
    model = f"lc-{uuid.uuid4().hex[:10]}"
    source = triton_repository / "simple"
    (tmp_path / "good").mkdir()
    (tmp_path / "broken").mkdir()
    good = model_directory(source, tmp_path / "good")
    broken = model_directory(source, tmp_path / "broken", BROKEN_MODEL)
    (tmp_path / "unknown-backend").mkdir()
    unknown_backend = model_directory(source, tmp_path / "unknown-backend")
    config = (tmp_path / "unknown-backend" / "config.pbtxt").read_text()
    (tmp_path / "unknown-backend" / "config.pbtxt").write_text(
        config.replace('"python"', '"no_such_backend"')
    )

    await stub.CreateModel(registry_pb.CreateModelRequest(model=registry_pb.Model(name=f"models/{model}")))
    await register(stub, model, "1", good, s3)
    routes = RouteWatch(stub, model)
    async with asyncio.timeout(PATIENCE), asyncio.TaskGroup() as group:
        following = group.create_task(routes.follow())
        deployment = registry_pb.Deployment(
            pool=f"pools/{mesh.pool}", traffic=[registry_pb.TrafficSplit(version="1", weight=100)]
        )
        await stub.CreateDeployment(
            registry_pb.CreateDeploymentRequest(
                parent=f"models/{model}", deployment_id="main", deployment=deployment
            )
        )
        await routes.until("1", READY)
        # Fetched into the Triton's repository, with the manifest of what it was fetched from.
        assert (triton_repository / model / "1" / ".tensorway-artifact.json").is_file()

        async with grpc.aio.insecure_channel(mesh.router) as channel:
            client = ClientLoop(inference_grpc.InferenceServiceStub(channel), model)
            looping = group.create_task(client.run())
            await client.until(lambda: client.versions["1"] >= 10)

            # Version 2's model.py raises when Triton loads it: it never gets traffic, and its
            # half of the traffic stays with version 1.
            await register(stub, model, "2", broken, s3)
            await route_traffic(stub, model, {"1": 50, "2": 50})
            await routes.until("2", FAILED)
            served = sum(client.versions.values())
            await client.until(lambda: sum(client.versions.values()) >= served + 20)

            # Version 4's config.pbtxt names a backend Triton does not have: the model's config is
            # the newest version's, so the load fails whole; version 1 keeps serving, and is
            # loaded again on its own config.
            await register(stub, model, "4", unknown_backend, s3)
            await route_traffic(stub, model, {"1": 50, "2": 25, "4": 25})
            await routes.until("4", FAILED)
            served = sum(client.versions.values())
            await client.until(lambda: sum(client.versions.values()) >= served + 20)

            # Version 3 is good: the whole of the traffic moves to it once it is ready, and not
            # one request meets it before.
            await register(stub, model, "3", good, s3)
            await route_traffic(stub, model, {"1": 0, "2": 0, "3": 100, "4": 0})
            await routes.until("3", READY)
            await client.until(lambda: client.versions["3"] >= 20)
            looping.cancel()
        following.cancel()

    assert client.failures == []
    assert client.versions["2"] == client.versions["4"] == 0
    found = await stub.GetDeployment(
        registry_pb.GetDeploymentRequest(name=f"models/{model}/deployments/main")
    )
    readiness = {entry.version: entry for entry in found.deployment.readiness}
    assert readiness["2"].state == FAILED
    assert any("broken on purpose" in triton.reason for triton in readiness["2"].tritons)
    assert readiness["3"].state == READY
    assert readiness["4"].state == FAILED
    assert any("no_such_backend" in triton.reason for triton in readiness["4"].tritons)
    # Leave the session's Triton as it was: without a deployment the model is unloaded.
    await stub.DeleteDeployment(registry_pb.DeleteDeploymentRequest(name=f"models/{model}/deployments/main"))


@dataclass
class GhostListing:
    """S3 as it is, except that every listing names one more object, which does not exist: a
    fetch breaks after the real files have arrived. Counts the downloads it passes on."""

    real: S3Objects
    ghost: bool = True
    downloads: int = 0

    async def list(self, uri: ArtifactUri) -> list[ListedObject]:
        listing = await self.real.list(uri)
        return [*listing, ListedObject("1/zz-not-there.bin", 10, "")] if self.ghost else listing

    async def download(self, uri: ArtifactUri, key: str, target: Path) -> None:
        self.downloads += 1
        await self.real.download(uri, key, target)


async def test_a_fetch_that_breaks_half_way_leaves_no_half_copied_model(
    triton_repository: Path, s3: Any, s3_endpoint: str, s3_credentials: S3Credentials, tmp_path: Path
) -> None:
    model = f"lc-{uuid.uuid4().hex[:10]}"
    (tmp_path / "source").mkdir()
    directory = model_directory(triton_repository / "simple", tmp_path / "source")
    uri = await asyncio.to_thread(directory.upload, s3, model)
    objects = GhostListing(
        S3Objects(s3_endpoint, s3_credentials.access_key, s3_credentials.secret_key, "us-east-1")
    )
    root = tmp_path / "repository"
    repository = ModelRepository(root, objects)

    with pytest.raises(ArtifactError, match=r"zz-not-there\.bin"):
        await repository.fetch(model, "1", uri)
    assert objects.downloads == len(directory.files) + 1  # the real files came, then the ghost failed
    assert not (root / model).exists()
    left = sorted(await asyncio.to_thread(os.listdir, tmp_path))
    assert left == ["source"]  # no staging directory, no model, not even the repository

    # Fetched whole, it is checked once; fetched again from the same listing, nothing is downloaded.
    objects.ghost = False
    await repository.fetch(model, "1", uri)
    fetched = sorted(p.relative_to(root / model / "1").as_posix() for p in (root / model / "1").rglob("*"))
    assert fetched == sorted(
        [".tensorway-artifact.json", ".tensorway-config.pbtxt", "model.onnx", "model.py"]
    )
    before = objects.downloads
    await repository.fetch(model, "1", uri)
    assert objects.downloads == before

    # A newer artifact that breaks half-way leaves the version that was there as it was.
    (tmp_path / "source" / "1" / "model.py").write_text(BROKEN_MODEL)
    changed = await asyncio.to_thread(ModelDirectory.read(tmp_path / "source").upload, s3, model)
    objects.ghost = True
    with pytest.raises(ArtifactError):
        await repository.fetch(model, "1", changed)
    assert (root / model / "1" / "model.py").read_bytes() == (
        triton_repository / "simple" / "1" / "model.py"
    ).read_bytes()
    assert uri in (root / model / "1" / ".tensorway-artifact.json").read_text()
