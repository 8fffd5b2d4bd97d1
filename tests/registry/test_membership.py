"""Pool membership on the registry: orchestrators join their pool with a lease, routes carry them
beside the pool's hand-set endpoints, and they leave by LeavePool or by letting the lease run out.
Joining is a write: a caller without the orchestrators' internal identity is refused and nothing
changes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2

from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.runtime.context import TENANT_SCOPES, identity_metadata
from tests.registry.conftest import RunningRegistry, Stub, deploy, failure, start_registry
from tests.registry.test_registry_readiness import LOADING, READY, report, route_state
from tests.waiting import eventually

STATIC = "127.0.0.1:7001"
MEMBER = "127.0.0.1:7101"
OTHER_MEMBER = "127.0.0.1:7102"


def lease(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    return duration


async def join(stub: Stub, pool: str, endpoint: str, seconds: float = 300) -> pb.JoinPoolResponse:
    response: pb.JoinPoolResponse = await stub.JoinPool(
        pb.JoinPoolRequest(pool=f"pools/{pool}", endpoint=endpoint, lease_duration=lease(seconds))
    )
    return response


async def routed_endpoints(stub: Stub, model: str) -> list[str]:
    resolved = await stub.ResolveModel(pb.ResolveModelRequest(name=f"models/{model}"))
    (version,) = resolved.route.versions
    return list(version.endpoints)


@pytest.fixture
async def fast_sweeping_registry(postgres_url: str, redis_url: str) -> AsyncIterator[RunningRegistry]:
    running = await start_registry(
        postgres_url,
        redis_url,
        pool_member_sweep_interval=timedelta(seconds=0.2),
        pool_member_sweep_grace=timedelta(0),
    )
    yield running
    await running.stop()


async def test_members_join_beside_static_endpoints_and_watchers_hear_of_it(stub: Stub) -> None:
    deployed = await deploy(stub, versions=1, endpoints=(STATIC,))
    watch = stub.WatchRoutes(pb.WatchRoutesRequest(models=[deployed.model]))
    try:
        snapshot = await watch.read()
        assert isinstance(snapshot, pb.WatchRoutesResponse)
        assert list(snapshot.routes[0].versions[0].endpoints) == [STATIC]

        joined = await join(stub, deployed.pool, MEMBER)
        assert joined.expire_time.seconds > 0
        change = await watch.read()
        assert isinstance(change, pb.WatchRoutesResponse)
        assert list(change.routes[0].versions[0].endpoints) == [STATIC, MEMBER]
    finally:
        watch.cancel()
    # A member that is also set by hand appears once.
    await join(stub, deployed.pool, STATIC)
    assert await routed_endpoints(stub, deployed.model) == [STATIC, MEMBER]


async def first_update(stub: Stub, model: str) -> pb.WatchRoutesResponse:
    """The snapshot a watcher of `model` starts from."""
    watch = stub.WatchRoutes(pb.WatchRoutesRequest(models=[model]))
    try:
        update = await watch.read()
        assert isinstance(update, pb.WatchRoutesResponse)
        return update
    finally:
        watch.cancel()


async def test_a_heartbeat_renews_without_changing_the_route(stub: Stub) -> None:
    deployed = await deploy(stub, versions=1, endpoints=())
    first = await join(stub, deployed.pool, MEMBER)
    joined = await first_update(stub, deployed.model)
    renewed = await join(stub, deployed.pool, MEMBER)
    assert (first.joined, renewed.joined) == (True, False)
    assert renewed.expire_time.ToDatetime() >= first.expire_time.ToDatetime()
    again = await first_update(stub, deployed.model)
    assert again.revision == joined.revision, "a renewal is not a change of the route table"
    assert list(again.routes[0].versions[0].endpoints) == [MEMBER]


async def test_leaving_removes_the_member_and_its_readiness_at_once(stub: Stub) -> None:
    deployed = await deploy(stub, versions=1, endpoints=())
    await join(stub, deployed.pool, MEMBER)
    await join(stub, deployed.pool, OTHER_MEMBER)
    await report(stub, deployed.pool, MEMBER, deployed.model, READY)
    assert await route_state(stub, deployed.model) == READY

    await stub.LeavePool(pb.LeavePoolRequest(pool=f"pools/{deployed.pool}", endpoint=MEMBER))
    assert await routed_endpoints(stub, deployed.model) == [OTHER_MEMBER]
    # What the member that left reported counts no more: no endpoint has the version ready.
    assert await route_state(stub, deployed.model) != READY
    # Leaving twice is no error and changes nothing.
    await stub.LeavePool(pb.LeavePoolRequest(pool=f"pools/{deployed.pool}", endpoint=MEMBER))
    assert await routed_endpoints(stub, deployed.model) == [OTHER_MEMBER]


async def test_a_member_whose_lease_runs_out_leaves_by_itself(
    fast_sweeping_registry: RunningRegistry,
) -> None:
    stub = fast_sweeping_registry.stub
    deployed = await deploy(stub, versions=1, endpoints=(STATIC,))
    await join(stub, deployed.pool, MEMBER, seconds=1)
    await join(stub, deployed.pool, OTHER_MEMBER, seconds=300)
    assert await routed_endpoints(stub, deployed.model) == [STATIC, MEMBER, OTHER_MEMBER]

    async def expired() -> bool:
        return await routed_endpoints(stub, deployed.model) == [STATIC, OTHER_MEMBER]

    await eventually(expired, what="the member with a 1 s lease gone from the route")
    # Its next heartbeat is a new membership, which the answer says.
    assert (await join(stub, deployed.pool, MEMBER, seconds=300)).joined
    assert (await join(stub, deployed.pool, OTHER_MEMBER, seconds=300)).joined is False


async def test_a_registry_that_starts_lets_members_renew_leases_that_ran_out_while_it_was_away(
    postgres_url: str, redis_url: str
) -> None:
    """A registry restart (or a PostgreSQL outage) longer than a lease: the live members could
    not renew meanwhile, and the registry that comes back must not drop them all at its first
    sweep; a member renewing within the grace stays, with its place in the routes."""
    sweeps = {"pool_member_sweep_interval": timedelta(seconds=0.2)}
    first = await start_registry(postgres_url, redis_url, **sweeps, pool_member_sweep_grace=timedelta(0))
    deployed = await deploy(first.stub, versions=1, endpoints=())
    await join(first.stub, deployed.pool, MEMBER, seconds=1)
    await first.stop()

    # Autocommit: in a transaction, now() would stay the time it began.
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as connection:

        async def lapsed() -> bool:
            cursor = await connection.execute(
                "SELECT expire_time < now() FROM pool_members WHERE pool = %s AND endpoint = %s",
                (deployed.pool, MEMBER),
            )
            row = await cursor.fetchone()
            return row is not None and bool(row[0])

        await eventually(lapsed, what="the member's 1 s lease run out while no registry ran")

    grace = timedelta(minutes=2)
    second = await start_registry(postgres_url, redis_url, **sweeps, pool_member_sweep_grace=grace)
    try:
        renewed = await join(second.stub, deployed.pool, MEMBER, seconds=300)
        assert not renewed.joined, "the member was swept before it could renew"
        assert await routed_endpoints(second.stub, deployed.model) == [MEMBER]
    finally:
        await second.stop()


async def test_joining_without_the_internal_identity_is_refused_and_changes_nothing(
    registry: RunningRegistry, stub: Stub
) -> None:
    deployed = await deploy(stub, versions=1, endpoints=(STATIC,))
    await join(stub, deployed.pool, OTHER_MEMBER)
    before = await routed_endpoints(stub, deployed.model)
    request = pb.JoinPoolRequest(pool=f"pools/{deployed.pool}", endpoint=MEMBER, lease_duration=lease(60))
    leave = pb.LeavePoolRequest(pool=f"pools/{deployed.pool}", endpoint=OTHER_MEMBER)
    for identity in (None, identity_metadata("tenant-b", TENANT_SCOPES)):
        caller = registry.stub_as(identity)
        assert (await failure(caller.JoinPool(request))).code is grpc.StatusCode.PERMISSION_DENIED
        assert (await failure(caller.LeavePool(leave))).code is grpc.StatusCode.PERMISSION_DENIED
    assert await routed_endpoints(stub, deployed.model) == before == [STATIC, OTHER_MEMBER]


@pytest.mark.parametrize(
    ("endpoint", "seconds", "field"),
    [
        ("169.254.169.254:80", 10, "endpoint"),
        ("10.1.2.3:50051", 10, "endpoint"),
        ("orchestrator", 10, "endpoint"),
        (MEMBER, 0, "lease_duration"),
        (MEMBER, 3600, "lease_duration"),
    ],
)
async def test_a_member_must_lie_where_pools_may_with_a_bounded_lease(
    stub: Stub, endpoint: str, seconds: float, field: str
) -> None:
    deployed = await deploy(stub, versions=1, endpoints=(STATIC,))
    refused = await failure(join(stub, deployed.pool, endpoint, seconds))
    assert refused.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in refused.violations] == [field]
    assert await routed_endpoints(stub, deployed.model) == [STATIC]


async def test_joining_a_pool_that_does_not_exist_is_not_found(stub: Stub) -> None:
    refused = await failure(join(stub, "no-such-pool", MEMBER))
    assert refused.code is grpc.StatusCode.NOT_FOUND


async def test_in_a_pool_that_reports_states_a_member_serves_a_version_once_it_has_it_ready(
    stub: Stub,
) -> None:
    deployed = await deploy(stub, versions=1, endpoints=(STATIC,))
    await report(stub, deployed.pool, STATIC, deployed.model, READY)
    await join(stub, deployed.pool, MEMBER)
    # Still fetching or loading: routers are not sent to it for this version.
    await report(stub, deployed.pool, MEMBER, deployed.model, LOADING)
    assert await routed_endpoints(stub, deployed.model) == [STATIC]
    await report(stub, deployed.pool, MEMBER, deployed.model, READY)
    assert await routed_endpoints(stub, deployed.model) == [STATIC, MEMBER]
