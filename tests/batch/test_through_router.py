"""A batch job through the whole mesh: workers infer through the real router, which routes by the
real registry's deployments to the real orchestrator in front of Triton."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable

import grpc
import numpy as np
import pytest
from minio import Minio

from tensorway.batch import service as batch_service
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.common.v1 import tensor_pb2
from tensorway.orchestrator import service as orchestrator_service
from tensorway.registry import service as registry_service
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tensorway.router import service as router_service
from tensorway.runtime.context import ADMIN_SCOPES, identity_metadata

from .conftest import Pipeline, digits_rows, direct_answers, tenant, upload, wait_for_state
from .test_jobs import create, npy_of, read_results

pytestmark = pytest.mark.timeout(120)
# The registry's writes need an admin's token.
ADMIN = tuple(identity_metadata("batch-tests-admin", ADMIN_SCOPES))


async def _ignoring_exists(call: Awaitable[object]) -> None:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


async def _register_digits(registry: str, orchestrator: str) -> None:
    """digits version 1, served by a fresh pool of the orchestrator, all traffic to it."""
    async with grpc.aio.insecure_channel(registry) as channel:
        stub = registry_grpc.RegistryServiceStub(channel)
        version = registry_pb.ModelVersion(
            platform="python",
            inputs=[tensor_pb2.TensorSpec(name="input", datatype="FP32", shape=[64])],
            outputs=[
                tensor_pb2.TensorSpec(name="label", datatype="INT64", shape=[1]),
                tensor_pb2.TensorSpec(name="probabilities", datatype="FP32", shape=[10]),
            ],
            max_batch_size=256,
            artifact_uri="s3://models/digits/1",
        )
        pool = f"batch-{uuid.uuid4().hex[:8]}"
        # A database kept from an earlier run already knows digits: reuse it, redeploy it.
        await _ignoring_exists(
            stub.CreateModel(
                registry_pb.CreateModelRequest(model=registry_pb.Model(name="models/digits")), metadata=ADMIN
            )
        )
        await _ignoring_exists(
            stub.CreateModelVersion(
                registry_pb.CreateModelVersionRequest(
                    parent="models/digits", model_version_id="1", model_version=version
                ),
                metadata=ADMIN,
            )
        )
        deployment = "models/digits/deployments/main"
        try:
            old = (
                await stub.GetDeployment(registry_pb.GetDeploymentRequest(name=deployment), metadata=ADMIN)
            ).deployment
            await stub.DeleteDeployment(
                registry_pb.DeleteDeploymentRequest(name=deployment, etag=old.etag), metadata=ADMIN
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        await stub.CreatePool(
            registry_pb.CreatePoolRequest(
                pool=registry_pb.Pool(name=f"pools/{pool}", endpoints=[orchestrator])
            ),
            metadata=ADMIN,
        )
        await stub.CreateDeployment(
            registry_pb.CreateDeploymentRequest(
                parent="models/digits",
                deployment_id="main",
                deployment=registry_pb.Deployment(
                    pool=f"pools/{pool}", traffic=[registry_pb.TrafficSplit(version="1", weight=100)]
                ),
            ),
            metadata=ADMIN,
        )


@pytest.fixture(scope="module")
async def router(postgres_url: str, redis_url: str, triton_grpc: str) -> AsyncIterator[str]:
    """host:port of a router over a real registry and orchestrator."""
    started = []
    try:
        registry, registry_port = await registry_service.create(
            registry_service.Settings(postgres_url=postgres_url, redis_url=redis_url, metrics_enabled=False)
        )
        await registry.start()
        started.append(registry)
        orchestrator, orchestrator_port = await orchestrator_service.create(
            orchestrator_service.Settings(tritons=(triton_grpc,), models=("digits",), metrics_enabled=False)
        )
        await orchestrator.start()
        started.append(orchestrator)
        await _register_digits(f"127.0.0.1:{registry_port}", f"127.0.0.1:{orchestrator_port}")
        server, port = await router_service.create(
            router_service.Settings(registry_address=f"127.0.0.1:{registry_port}", metrics_enabled=False)
        )
        await server.start()
        started.append(server)
        yield f"127.0.0.1:{port}"
    finally:
        for running in reversed(started):
            await running.stop()


async def test_a_job_through_router_orchestrator_and_triton(
    router: str, pipeline: Pipeline, s3: Minio, triton_grpc: str
) -> None:
    # Its own topic and consumer group, with workers that infer through the router.
    mesh = pipeline.sibling(inference_target=router)
    api, port = await batch_service.create(mesh.api_settings)
    await api.start()
    try:
        mesh.start_worker()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.BatchServiceStub(channel)
            rows = digits_rows(1200, seed=10)
            job = await create(stub, "acme", upload(s3, npy_of(rows), ".npy"), shard_size=300)
            done = await wait_for_state(stub, job.name, "acme")
            assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
            lines = read_results(done)
            labels, probabilities = await direct_answers(triton_grpc, rows)
            assert [line["outputs"]["label"] for line in lines] == labels.tolist()
            got = np.array([line["outputs"]["probabilities"] for line in lines], dtype=np.float32)
            np.testing.assert_array_equal(got, probabilities)
            listed = await stub.ListJobs(pb.ListJobsRequest(), metadata=tenant("acme"))
            assert done.name in {j.name for j in listed.jobs}
    finally:
        mesh.stop_all()
        await api.stop()
