"""Readiness: orchestrators report each version's state per Triton; routes and deployments carry
it, and a version is READY once enough of its pool's endpoints have it ready."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.runtime.context import TENANT_SCOPES, identity_metadata
from tests.registry.conftest import RunningRegistry, Stub, deploy, start_registry

ENDPOINTS = ("127.0.0.1:7001", "127.0.0.1:7002")
TRITON = "127.0.0.1:8001"
READY = pb.MODEL_VERSION_STATE_READY
LOADING = pb.MODEL_VERSION_STATE_LOADING
FAILED = pb.MODEL_VERSION_STATE_FAILED
UNKNOWN = pb.MODEL_VERSION_STATE_UNSPECIFIED


async def report(stub: Stub, pool: str, endpoint: str, model: str, state: int, reason: str = "") -> None:
    await stub.ReportModelStates(
        pb.ReportModelStatesRequest(
            pool=f"pools/{pool}",
            endpoint=endpoint,
            states=[pb.ModelStateReport(model=model, version="1", triton=TRITON, state=state, reason=reason)],
        )
    )


async def readiness(stub: Stub, model: str) -> pb.VersionReadiness:
    found = await stub.GetDeployment(pb.GetDeploymentRequest(name=f"models/{model}/deployments/main"))
    (only,) = found.deployment.readiness
    return only


async def route_state(stub: Stub, model: str) -> int:
    resolved = await stub.ResolveModel(pb.ResolveModelRequest(name=f"models/{model}"))
    (version,) = resolved.route.versions
    return int(version.state)


async def test_a_version_is_ready_once_one_endpoint_of_its_pool_has_it_ready(stub: Stub) -> None:
    deployed = await deploy(stub, versions=1, endpoints=ENDPOINTS)
    model, pool = deployed.model, deployed.pool
    # A pool whose orchestrators report nothing is routed as before.
    assert (await readiness(stub, model)).state == UNKNOWN
    assert await route_state(stub, model) == UNKNOWN

    await report(stub, pool, ENDPOINTS[0], model, LOADING, "fetching s3://models/x/")
    loading = await readiness(stub, model)
    assert (loading.state, loading.ready_endpoints, loading.required_endpoints) == (LOADING, 0, 1)
    assert [(t.endpoint, t.triton, t.reason) for t in loading.tritons] == [
        (ENDPOINTS[0], TRITON, "fetching s3://models/x/")
    ]
    assert await route_state(stub, model) == LOADING

    await report(stub, pool, ENDPOINTS[0], model, READY)
    ready = await readiness(stub, model)
    assert (ready.state, ready.ready_endpoints) == (READY, 1)
    assert await route_state(stub, model) == READY


async def test_a_version_every_endpoint_fails_is_failed_with_tritons_reasons(stub: Stub) -> None:
    deployed = await deploy(stub, versions=1, endpoints=ENDPOINTS)
    model, pool = deployed.model, deployed.pool
    # The other endpoint reports, but has not got to the version yet: it may still load it.
    await stub.ReportModelStates(pb.ReportModelStatesRequest(pool=f"pools/{pool}", endpoint=ENDPOINTS[1]))
    await report(stub, pool, ENDPOINTS[0], model, FAILED, "model.py raised: broken on purpose")
    assert (await readiness(stub, model)).state == LOADING
    await report(stub, pool, ENDPOINTS[1], model, FAILED, "model.py raised: broken on purpose")
    failed = await readiness(stub, model)
    assert failed.state == FAILED
    assert {t.reason for t in failed.tritons} == {"model.py raised: broken on purpose"}


@pytest.fixture
async def strict_registry(postgres_url: str, redis_url: str) -> AsyncIterator[RunningRegistry]:
    running = await start_registry(postgres_url, redis_url, min_ready_share=1.0)
    yield running
    await running.stop()


async def test_the_share_of_ready_endpoints_a_version_needs_is_a_setting(
    strict_registry: RunningRegistry,
) -> None:
    stub = strict_registry.stub
    deployed = await deploy(stub, versions=1, endpoints=ENDPOINTS)
    await report(stub, deployed.pool, ENDPOINTS[0], deployed.model, READY)
    half = await readiness(stub, deployed.model)
    assert (half.state, half.ready_endpoints, half.required_endpoints) == (LOADING, 1, 2)
    await report(stub, deployed.pool, ENDPOINTS[1], deployed.model, READY)
    assert (await readiness(stub, deployed.model)).state == READY


async def test_only_admins_report_and_only_they_see_addresses(registry: RunningRegistry) -> None:
    deployed = await deploy(registry.stub, versions=1, endpoints=ENDPOINTS)
    await report(registry.stub, deployed.pool, ENDPOINTS[0], deployed.model, READY)
    tenant = registry.stub_as(identity_metadata("b", TENANT_SCOPES))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await report(tenant, deployed.pool, ENDPOINTS[0], deployed.model, FAILED, "forged")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    shown = await readiness(tenant, deployed.model)
    assert shown.state == READY
    assert [(t.endpoint, t.triton) for t in shown.tritons] == [("", "")]


async def test_a_report_naming_nothing_valid_is_refused_by_field(stub: Stub) -> None:
    deployed = await deploy(stub, versions=1, endpoints=ENDPOINTS)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReportModelStates(
            pb.ReportModelStatesRequest(
                pool=f"pools/{deployed.pool}",
                endpoint="not an address",
                states=[pb.ModelStateReport(model=deployed.model, version="1", triton=TRITON)],
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await report(stub, "no-such-pool", ENDPOINTS[0], deployed.model, READY)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
