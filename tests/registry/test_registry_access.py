"""The registry played by a hostile tenant: writes without the admin scope, pools aimed at
addresses no pool may have, reads that would reveal where backends live, and page tokens of
the attacker's making. Each is refused with the right code, and nothing changes."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from pydantic import ValidationError

from tensorway.registry.service import Settings
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.runtime.context import TENANT_SCOPES, Scope, identity_metadata

from .conftest import (
    Deployed,
    RunningRegistry,
    Stub,
    deploy,
    failure,
    mask,
    start_registry,
    unique,
    version_body,
)

SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"]
READS = {
    "GetModel",
    "ListModels",
    "GetModelVersion",
    "ListModelVersions",
    "GetPool",
    "ListPools",
    "GetDeployment",
    "ListDeployments",
    "ResolveModel",
    "WatchRoutes",
    "GetRollout",
    "ListRollouts",
}
TENANT_B = identity_metadata("b", TENANT_SCOPES)
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Target:
    """A deployed model (versions 1 and 2, pool, deployment `main`) and a pool nothing uses."""

    deployed: Deployed
    spare_pool: str

    @property
    def model(self) -> str:
        return f"models/{self.deployed.model}"

    @property
    def pool(self) -> str:
        return f"pools/{self.deployed.pool}"


@pytest.fixture
async def target(stub: Stub) -> Target:
    deployed = await deploy(stub)
    spare = f"pools/{unique('spare')}"
    await stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name=spare, endpoints=["127.0.0.1:9"])))
    return Target(deployed, spare)


def writes(target: Target) -> dict[str, Message]:
    """A request for every write RPC that an admin could make succeed."""
    model, deployment = target.model, f"{target.model}/deployments/main"
    return {
        "CreateModel": pb.CreateModelRequest(model=pb.Model(name=f"models/{unique('b-model')}")),
        "UpdateModel": pb.UpdateModelRequest(
            model=pb.Model(name=model, description="owned by b"), update_mask=mask("description")
        ),
        "DeleteModel": pb.DeleteModelRequest(name=model),
        "CreateModelVersion": pb.CreateModelVersionRequest(parent=model, model_version=version_body()),
        "UpdateModelVersion": pb.UpdateModelVersionRequest(
            model_version=pb.ModelVersion(name=f"{model}/versions/2", metrics={"accuracy": 1.0}),
            update_mask=mask("metrics"),
        ),
        "DeleteModelVersion": pb.DeleteModelVersionRequest(name=f"{model}/versions/2"),
        "TransitionModelVersionStage": pb.TransitionModelVersionStageRequest(
            name=f"{model}/versions/1", stage=pb.STAGE_STAGING
        ),
        "CreatePool": pb.CreatePoolRequest(
            pool=pb.Pool(name=f"pools/{unique('b-pool')}", endpoints=["127.0.0.1:9"])
        ),
        "UpdatePool": pb.UpdatePoolRequest(
            pool=pb.Pool(name=target.pool, endpoints=["127.0.0.66:50051"]), update_mask=mask("endpoints")
        ),
        "DeletePool": pb.DeletePoolRequest(name=target.spare_pool),
        "CreateDeployment": pb.CreateDeploymentRequest(
            parent=model,
            deployment_id="b-steals",
            deployment=pb.Deployment(
                pool=target.spare_pool, traffic=[pb.TrafficSplit(version="2", weight=100)]
            ),
        ),
        "UpdateDeployment": pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(name=deployment, traffic=[pb.TrafficSplit(version="2", weight=100)]),
            update_mask=mask("traffic"),
        ),
        "DeleteDeployment": pb.DeleteDeploymentRequest(name=deployment),
        "StartRollout": pb.StartRolloutRequest(parent=model, rollout=pb.Rollout(to_version="2")),
        "PauseRollout": pb.PauseRolloutRequest(name=f"{model}/rollouts/1"),
        "ResumeRollout": pb.ResumeRolloutRequest(name=f"{model}/rollouts/1"),
        "AbortRollout": pb.AbortRolloutRequest(name=f"{model}/rollouts/1"),
        "ReportTraffic": pb.ReportTrafficRequest(
            versions=[pb.VersionTraffic(model=target.deployed.model, version="2", requests=1)]
        ),
        "ReportModelStates": pb.ReportModelStatesRequest(
            pool=target.pool,
            endpoint="127.0.0.1:9",
            states=[
                pb.ModelStateReport(
                    model=target.deployed.model,
                    version="1",
                    triton="127.0.0.1:8001",
                    state=pb.MODEL_VERSION_STATE_READY,
                )
            ],
        ),
        "JoinPool": pb.JoinPoolRequest(
            pool=target.pool, endpoint="127.0.0.1:9", lease_duration=duration_pb2.Duration(seconds=60)
        ),
        "LeavePool": pb.LeavePoolRequest(pool=target.pool, endpoint="127.0.0.1:7001"),
    }


async def first_route_snapshot(stub: Stub, model: str) -> bytes:
    """What a router watching `model` is sent first: its route as the registry has it now
    (without the registry-wide revision)."""
    call = stub.WatchRoutes(pb.WatchRoutesRequest(models=[model]))
    try:
        async for update in call:
            assert update.snapshot
            update.ClearField("revision")  # moves with every registry write, routed or not
            return update.SerializeToString()
    finally:
        call.cancel()
    raise AssertionError("WatchRoutes ended without a snapshot")


async def snapshot(stub: Stub, target: Target) -> list[bytes]:
    """The target's rows and route, byte for byte, as an admin reads them."""
    model = target.model
    return [
        (await stub.GetModel(pb.GetModelRequest(name=model))).SerializeToString(),
        (await stub.ListModelVersions(pb.ListModelVersionsRequest(parent=model))).SerializeToString(),
        (await stub.ListDeployments(pb.ListDeploymentsRequest(parent=model))).SerializeToString(),
        (await stub.GetPool(pb.GetPoolRequest(name=target.pool))).SerializeToString(),
        (await stub.GetPool(pb.GetPoolRequest(name=target.spare_pool))).SerializeToString(),
        await first_route_snapshot(stub, target.deployed.model),
    ]


def test_every_rpc_is_a_read_or_a_write_the_tests_try() -> None:
    # A new RPC must be classed here, so the refusals below cover it.
    names = set(SERVICE.methods_by_name)
    dummy = Target(Deployed("m", "p", pb.Deployment()), "spare")
    assert names == READS | set(writes(dummy)), "classify every RegistryService RPC as read or write"
    assert not READS & set(writes(dummy))


@pytest.mark.parametrize(
    "caller",
    [
        pytest.param(TENANT_B, id="tenant"),
        pytest.param(None, id="unidentified"),
        pytest.param([("x-tenant-id", "b")], id="tenant-without-scopes"),
        pytest.param(identity_metadata("b", [Scope.MODELS_READ]), id="reader"),
    ],
)
async def test_writes_without_the_admin_scope_are_refused_and_change_nothing(
    registry: RunningRegistry, target: Target, caller: list[tuple[str, str]] | None
) -> None:
    attacker = registry.stub_as(caller)
    before = await snapshot(registry.stub, target)
    attempts = writes(target)
    for method, request in attempts.items():
        error = await failure(getattr(attacker, method)(request))
        assert error.code == DENIED, method
        assert error.reason == "PERMISSION_DENIED", method
    assert await snapshot(registry.stub, target) == before
    model = attempts["CreateModel"].model.name  # type: ignore[attr-defined]
    pool = attempts["CreatePool"].pool.name  # type: ignore[attr-defined]
    assert (await failure(registry.stub.GetModel(pb.GetModelRequest(name=model)))).code == NOT_FOUND
    assert (await failure(registry.stub.GetPool(pb.GetPoolRequest(name=pool)))).code == NOT_FOUND


async def test_a_refused_write_says_which_scope_it_needs_before_looking_at_the_request(
    registry: RunningRegistry,
) -> None:
    # Even a malformed write is refused for its missing scope, not judged on its fields.
    error = await failure(registry.stub_as(TENANT_B).CreatePool(pb.CreatePoolRequest()))
    assert error.code == DENIED
    assert error.violations == []


async def test_tenant_reads_show_no_pool_addresses(registry: RunningRegistry, target: Target) -> None:
    for caller in (TENANT_B, None):
        reader = registry.stub_as(caller)
        got = (await reader.GetPool(pb.GetPoolRequest(name=target.pool))).pool
        assert got.name == target.pool
        assert list(got.endpoints) == []
        listed = (await reader.ListPools(pb.ListPoolsRequest(page_size=1000))).pools
        assert any(pool.name == target.pool for pool in listed)
        assert all(not pool.endpoints for pool in listed)
        resolved = await reader.ResolveModel(pb.ResolveModelRequest(name=target.model))
        assert resolved.route.versions
        assert all(not v.endpoints for v in resolved.route.versions)
        # Everything else a reader may see is there.
        deployment = (
            await reader.ListDeployments(pb.ListDeploymentsRequest(parent=target.model))
        ).deployments
        assert [d.pool for d in deployment] == [target.pool]
    # The admin, asking the same questions after them, still sees the addresses.
    got = (await registry.stub.GetPool(pb.GetPoolRequest(name=target.pool))).pool
    assert list(got.endpoints) == ["127.0.0.1:7001"]
    resolved = await registry.stub.ResolveModel(pb.ResolveModelRequest(name=target.model))
    assert list(resolved.route.versions[0].endpoints) == ["127.0.0.1:7001"]


async def test_a_token_that_may_not_read_cannot_read(registry: RunningRegistry, target: Target) -> None:
    infer_only = registry.stub_as(identity_metadata("b", [Scope.INFER]))
    for call in (
        infer_only.GetModel(pb.GetModelRequest(name=target.model)),
        infer_only.ListPools(pb.ListPoolsRequest()),
        infer_only.ResolveModel(pb.ResolveModelRequest(name=target.model)),
    ):
        assert (await failure(call)).code == DENIED


async def test_watch_routes_serves_internal_callers_and_refuses_tenants(
    registry: RunningRegistry, target: Target
) -> None:
    # Routers and orchestrators watch without identity, and get the endpoints they route to.
    update = pb.WatchRoutesResponse.FromString(
        await first_route_snapshot(registry.stub_as(None), target.deployed.model)
    )
    assert list(update.routes[0].versions[0].endpoints) == ["127.0.0.1:7001"]
    call = registry.stub_as(TENANT_B).WatchRoutes(pb.WatchRoutesRequest(models=[target.deployed.model]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == DENIED


# Where pools may live

NEVER = [
    "169.254.169.254:80",  # every cloud's metadata service
    "[fd00:ec2::254]:80",  # AWS's, over IPv6
    "metadata.google.internal:80",
    "METADATA.google.internal.:80",
    "169.254.10.1:8001",  # link-local
    "[fe80::1]:8001",
    "[::ffff:169.254.169.254]:80",  # the metadata address inside IPv6
    "[64:ff9b::a9fe:a9fe]:80",  # ... through NAT64
    "2852039166:80",  # 169.254.169.254 as a resolver also reads it
    "0xa9fea9fe:80",
    "169.254.43518:80",
    "0.0.0.0:8001",
]
NOT_ALLOWED_BY_DEFAULT = ["10.1.2.3:8001", "192.168.1.1:8001", "attacker.example.com:443", "[2001:db8::1]:80"]


@pytest.mark.parametrize("endpoint", NEVER + NOT_ALLOWED_BY_DEFAULT)
async def test_a_pool_at_a_forbidden_address_is_refused_and_nothing_is_written(
    registry: RunningRegistry, target: Target, endpoint: str
) -> None:
    stub = registry.stub
    before = await snapshot(stub, target)
    name = f"pools/{unique('bad')}"
    created = await failure(
        stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name=name, endpoints=["127.0.0.1:9", endpoint])))
    )
    assert created.code == INVALID
    assert [field for field, _ in created.violations] == ["pool.endpoints[1]"]
    assert (await failure(stub.GetPool(pb.GetPoolRequest(name=name)))).code == NOT_FOUND

    # Moving the deployed pool there is refused too: its row and the route routers see stay.
    updated = await failure(
        stub.UpdatePool(
            pb.UpdatePoolRequest(
                pool=pb.Pool(name=target.pool, endpoints=[endpoint]), update_mask=mask("endpoints")
            )
        )
    )
    assert updated.code == INVALID
    assert [field for field, _ in updated.violations] == ["pool.endpoints[0]"]
    assert await snapshot(stub, target) == before


@pytest.fixture
async def wide_registry(postgres_url: str, redis_url: str) -> AsyncIterator[RunningRegistry]:
    """A registry whose operator allows a private network, a DNS zone, and (wrongly) everything."""
    running = await start_registry(
        postgres_url,
        redis_url,
        pool_endpoint_allow=("10.0.0.0/8", "*.pools.example.internal", "0.0.0.0/0", "::/0", "*"),
    )
    yield running
    await running.stop()


async def test_the_allow_list_admits_what_the_operator_names_but_never_metadata(
    wide_registry: RunningRegistry,
) -> None:
    stub = wide_registry.stub
    name = f"pools/{unique('wide')}"
    allowed = ["10.1.2.3:8001", "orchestrator-0.pools.example.internal:50053"]
    created = await stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name=name, endpoints=allowed)))
    assert list(created.pool.endpoints) == allowed
    for endpoint in NEVER:
        error = await failure(
            stub.UpdatePool(
                pb.UpdatePoolRequest(
                    pool=pb.Pool(name=name, endpoints=[endpoint]), update_mask=mask("endpoints")
                )
            )
        )
        assert error.code == INVALID, endpoint
    assert list((await stub.GetPool(pb.GetPoolRequest(name=name))).pool.endpoints) == allowed


def test_a_bad_allow_list_entry_stops_the_registry_at_start() -> None:
    with pytest.raises(ValidationError, match="pool_endpoint_allow"):
        Settings(pool_endpoint_allow=("10.0.0.0/33",))
    with pytest.raises(ValidationError, match="pool_endpoint_allow"):
        Settings(pool_endpoint_allow=("orchestrator:50053",))


def test_the_allow_list_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORWAY_REGISTRY_POOL_ENDPOINT_ALLOW", '["orchestrator", "10.0.0.0/8"]')
    assert Settings().pool_endpoint_allow == ("orchestrator", "10.0.0.0/8")


# Page tokens


def forged(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


FORGED_TOKENS = [
    "not a token",
    "AAAA",
    "====",
    "eyJhZnRlciI6",  # base64 of a JSON fragment
    "é",
    "A" * 10_000,
    forged([1, 2]),
    forged("after"),
    forged({"after": "a"}),
    forged({"after": "a", "query": "0" * 32, "more": 1}),
    forged({"after": ["a"], "query": 1}),
]


async def real_tokens(stub: Stub, target: Target) -> dict[str, str]:
    """A real next_page_token of each list, from pages of one."""
    # Second rows where the target has only one, so every list has a next page.
    await stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=f"models/{unique('model')}")))
    await stub.CreateDeployment(
        pb.CreateDeploymentRequest(
            parent=target.model,
            deployment_id="second",
            deployment=pb.Deployment(pool=target.pool, traffic=[pb.TrafficSplit(version="1", weight=100)]),
        )
    )
    pages = {
        "ListModels": await stub.ListModels(pb.ListModelsRequest(page_size=1)),
        "ListModelVersions": await stub.ListModelVersions(
            pb.ListModelVersionsRequest(parent=target.model, page_size=1)
        ),
        "ListPools": await stub.ListPools(pb.ListPoolsRequest(page_size=1)),
        "ListDeployments": await stub.ListDeployments(
            pb.ListDeploymentsRequest(parent=target.model, page_size=1)
        ),
    }
    tokens = {method: page.next_page_token for method, page in pages.items()}
    assert all(tokens.values()), tokens
    return tokens


def list_request(method: str, target: Target, token: str, parent: str = "") -> Message:
    parent = parent or target.model
    return {
        "ListModels": lambda: pb.ListModelsRequest(page_token=token),
        "ListModelVersions": lambda: pb.ListModelVersionsRequest(parent=parent, page_token=token),
        "ListPools": lambda: pb.ListPoolsRequest(page_token=token),
        "ListDeployments": lambda: pb.ListDeploymentsRequest(parent=parent, page_token=token),
    }[method]()


LISTS = ["ListModels", "ListModelVersions", "ListPools", "ListDeployments"]


@pytest.mark.parametrize("method", LISTS)
async def test_forged_and_foreign_page_tokens_are_invalid_argument(
    stub: Stub, target: Target, method: str
) -> None:
    minted = await real_tokens(stub, target)
    real = json.loads(base64.urlsafe_b64decode(minted[method]))
    query = real["query"]
    tokens = [
        *FORGED_TOKENS,
        # The right query, keys of the wrong type, range or content.
        forged({"after": [1], "query": query}),
        forged({"after": None, "query": query}),
        forged({"after": True, "query": query}),
        forged({"after": 1.5, "query": query}),
        forged({"after": {"a": 1}, "query": query}),
        forged({"after": 2**70, "query": query}),
        forged({"after": -1, "query": query}),
        forged({"after": "", "query": query}),
        forged({"after": "a\u0000b", "query": query}),
        forged({"after": "\ud800", "query": query}),
        forged({"after": "x" * 300, "query": query}),
        forged({"after": "1" if isinstance(real["after"], int) else 1, "query": query}),
        # Another query's position, and the tokens the other lists minted.
        forged({"after": real["after"], "query": "0" * 32}),
        *(token for other, token in minted.items() if other != method),
    ]
    for token in tokens:
        error = await failure(getattr(stub, method)(list_request(method, target, token)))
        assert error.code == INVALID, (method, token)
        assert [field for field, _ in error.violations] == ["page_token"], (method, token)
    if method in ("ListModelVersions", "ListDeployments"):
        elsewhere = await deploy(stub)
        token = forged(real)
        error = await failure(
            getattr(stub, method)(list_request(method, target, token, parent=f"models/{elsewhere.model}"))
        )
        assert error.code == INVALID
    # The real token still works.
    await getattr(stub, method)(list_request(method, target, forged(real)))
