"""The registry's parts on their own: the route table, route building, the versioned cache,
single flight, filters and page tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from tensorway.registry.cache import RedisCache, SingleFlight
from tensorway.registry.core import choose_version
from tensorway.registry.domain import (
    Change,
    Deployment,
    ModelVersion,
    Route,
    Shadow,
    Stage,
    TrafficSplit,
    build_route,
)
from tensorway.registry.routes import WATCHER_BACKLOG, PublishedRoutes, RouteSync
from tensorway.registry.rows import MAX_PAGE_SIZE
from tensorway.registry.store import RegistryStore
from tensorway.registry.validation import EndpointAllowList, parse_model_filter, parse_model_version_filter
from tensorway.runtime import InvalidArgument, NotFound
from tensorway.runtime.postgres import PageCursor
from tensorway.tensors.signatures import TensorSpec

from .conftest import unique

SPEC = (TensorSpec("input", "FP32", (4,)),)


def route(model: str, weight_of_1: int = 100) -> Route:
    versions = {
        v: ModelVersion(model, v, "python", SPEC, SPEC, 8, "s3://x", Stage.STAGING) for v in ("1", "2")
    }
    traffic = [TrafficSplit("1", weight_of_1)]
    if weight_of_1 < 100:
        traffic.append(TrafficSplit("2", 100 - weight_of_1))
    built = build_route(
        model, [Deployment(model, "main", "pool-a", tuple(traffic))], {"pool-a": ("h:1",)}, versions
    )
    assert built is not None
    return built


def test_build_route_merges_deployments_and_keeps_alias_and_shadow_versions() -> None:
    versions = {v: ModelVersion("m", v, "python", SPEC, SPEC, 8, "s3://x") for v in ("1", "2", "3", "10")}
    deployments = [
        Deployment("m", "a", "pool-a", (TrafficSplit("10", 70), TrafficSplit("2", 30)), {"canary": "3"}),
        Deployment("m", "b", "pool-b", (TrafficSplit("2", 100),), shadow=Shadow("1", 5)),
    ]
    built = build_route("m", deployments, {"pool-a": ("a:1",), "pool-b": ("b:1", "b:2")}, versions)
    assert built is not None
    assert [(v.version, v.pool, v.weight) for v in built.versions] == [
        ("2", "pool-a", 30),
        ("3", "pool-a", 0),
        ("10", "pool-a", 70),
        ("1", "pool-b", 0),
        ("2", "pool-b", 100),
    ]
    assert built.aliases == {"canary": "3"}
    assert built.shadow == Shadow("1", 5)
    assert build_route("m", [], {}, versions) is None


def test_choose_version() -> None:
    split = route("m", weight_of_1=30)
    assert choose_version(split, "") == "2"
    assert choose_version(split, "1") == "1"
    aliased = Route("m", split.versions, {"stable": "1"}, None)
    assert choose_version(aliased, "stable") == "1"
    with pytest.raises(NotFound):
        choose_version(aliased, "nightly")


async def test_route_table_applies_only_newer_revisions_and_tells_watchers() -> None:
    table = PublishedRoutes()
    table.replace({"a": route("a")}, revision=5)
    everything, only_b = table.watch(), table.watch(["b"])
    first = await everything.next()
    assert first.snapshot
    assert [r.model for r in first.routes] == ["a"]
    assert (await only_b.next()).routes == ()

    table.apply("b", route("b"), revision=7)
    table.apply("b", route("b", weight_of_1=50), revision=6)  # older than what the table has
    assert table.get("b") == route("b")
    for watcher in (everything, only_b):
        update = await watcher.next()
        assert (update.revision, [r.model for r in update.routes]) == (7, ["b"])

    # A full reload taken before revision 7 must not undo b, but does remove a.
    table.replace({}, revision=6)
    assert table.get("b") == route("b")
    assert table.get("a") is None
    removal = await everything.next()
    assert removal.removed_models == ("a",)
    assert only_b._queue.empty()
    table.apply("b", None, revision=8)
    assert (await only_b.next()).removed_models == ("b",)
    everything.close()
    only_b.close()


async def test_a_watcher_that_falls_behind_gets_a_fresh_snapshot() -> None:
    table = PublishedRoutes()
    watcher = table.watch()
    for revision in range(1, WATCHER_BACKLOG + 10):
        table.apply("m", route("m", weight_of_1=revision % 2 * 50 + 50), revision)
    # The backlog was dropped for a snapshot of the table as it was then; what came after follows.
    snapshot = await watcher.next()
    assert snapshot.snapshot
    assert [r.model for r in snapshot.routes] == ["m"]
    following = [(await watcher.next()).revision for _ in range(WATCHER_BACKLOG + 9 - snapshot.revision)]
    assert following == list(range(snapshot.revision + 1, WATCHER_BACKLOG + 10))
    assert watcher._queue.empty()
    watcher.close()


async def test_single_flight_shares_one_load_and_survives_a_cancelled_caller() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    loads = 0
    release = asyncio.Event()

    async def load() -> int:
        nonlocal loads
        loads += 1
        await release.wait()
        return 42

    callers = [asyncio.ensure_future(flights.do("k", load)) for _ in range(10)]
    await asyncio.sleep(0)
    callers[0].cancel()
    release.set()
    results = await asyncio.gather(*callers[1:])
    assert results == [42] * 9
    assert loads == 1
    assert await flights.do("k", load) == 42
    assert loads == 2, "a finished flight is not reused"


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[RedisCache]:
    cache = RedisCache.connect(
        redis_url,
        timeout=timedelta(seconds=1),
        ttl=timedelta(seconds=30),
        outage_backoff=timedelta(seconds=1),
    )
    yield cache
    await cache.close()


async def test_a_tombstone_keeps_an_older_read_out_of_the_cache(cache: RedisCache) -> None:
    key = f"tensorway:registry:test:{unique()}"
    await cache.put(key, 5, b"read at 5")
    assert (await cache.get(key)) is not None
    await cache.invalidate(Change(revision=6, models=frozenset(), keys=frozenset({key})))
    assert await cache.get(key) is None
    await cache.put(key, 5, b"a slow reader's old row")  # loaded before the write committed
    assert await cache.get(key) is None
    await cache.put(key, 6, b"read at 6")
    cached = await cache.get(key)
    assert cached is not None
    assert (cached.revision, cached.payload) == (6, b"read at 6")


async def test_changes_published_on_redis_reach_subscribers(cache: RedisCache) -> None:
    received = cache.changes(timedelta(milliseconds=100))
    first = asyncio.ensure_future(anext(received))
    change = Change(revision=99, models=frozenset({"m"}), keys=frozenset())
    for _ in range(50):  # until the subscription is in place
        await cache.publish(change)
        done, _ = await asyncio.wait({first}, timeout=0.05)
        if done:
            break
    assert first.result() == Change(revision=99, models=frozenset({"m"}), keys=frozenset())
    await received.aclose()


async def test_registries_on_other_databases_of_one_redis_do_not_hear_each_other(
    cache: RedisCache, redis_url: str
) -> None:
    """Redis's channels span its databases: a registry on database 6 of the same server announces
    revisions of another PostgreSQL, which this registry must never wait for."""
    other = RedisCache.connect(
        redis_url.rsplit("/", 1)[0] + "/6",
        timeout=timedelta(seconds=1),
        ttl=timedelta(seconds=30),
        outage_backoff=timedelta(seconds=1),
    )
    received = cache.changes(timedelta(milliseconds=100))
    first = asyncio.ensure_future(anext(received))
    foreign = Change(revision=10**9, models=frozenset({"m"}), keys=frozenset())
    own = Change(revision=99, models=frozenset({"m"}), keys=frozenset())
    try:
        for _ in range(50):  # until the subscription is in place
            # One server delivers in the order published: the other's change would come first.
            await other.publish(foreign)
            await cache.publish(own)
            done, _ = await asyncio.wait({first}, timeout=0.05)
            if done:
                break
        assert first.result() == own
    finally:
        await received.aclose()
        await other.close()


async def test_a_change_announced_past_the_database_gets_the_databases_answer(
    cache: RedisCache, postgres_url: str
) -> None:
    """A route asked for at a revision PostgreSQL has not got is answered from PostgreSQL: the
    registry does not ask again and again for a revision that is not coming."""
    store = await RegistryStore.open(
        postgres_url, pool_size=2, wait=timedelta(seconds=5), retry_after=timedelta(seconds=1)
    )
    try:
        sync = RouteSync(PublishedRoutes(), store, cache, timedelta(seconds=1))
        # A deadline, not a timing claim: without one, a spinning load would hang the suite.
        loaded = await asyncio.wait_for(sync.load_route(f"m-{unique()}", min_revision=10**12), 60)
        assert loaded.value is None
        assert loaded.revision < 10**12
    finally:
        await store.close()


def test_filters_are_parsed_strictly() -> None:
    assert parse_model_filter(" team=vision AND tier=gold ").labels == {"team": "vision", "tier": "gold"}
    assert parse_model_filter("").labels == {}
    versions = parse_model_version_filter("stage=production AND platform=python")
    assert (versions.stage, versions.platform) == (Stage.PRODUCTION, "python")
    for bad in ("team", "team=a OR tier=b", "=x", "team=a b"):
        with pytest.raises(InvalidArgument) as caught:
            parse_model_filter(bad)
        assert caught.value.violations[0].field == "filter"
    for bad in ("stage=LIVE", "stage=DRAFT AND stage=STAGING", "owner=me"):
        with pytest.raises(InvalidArgument):
            parse_model_version_filter(bad)


def test_page_tokens_round_trip_and_are_bound_to_their_query() -> None:
    first = PageCursor(2, "", "query-a", max_page_size=MAX_PAGE_SIZE)
    rows = [{"name": n} for n in ("a", "b", "c")]
    page, token = first.page(rows, "name")
    assert [r["name"] for r in page] == ["a", "b"]
    assert PageCursor(2, token, "query-a", max_page_size=MAX_PAGE_SIZE).after == "b"
    with pytest.raises(InvalidArgument):
        PageCursor(2, token, "query-b", max_page_size=MAX_PAGE_SIZE)
    assert first.page(rows[:2], "name") == (rows[:2], "")
    assert PageCursor(5000, "", "", max_page_size=MAX_PAGE_SIZE).limit == 1000


def test_page_tokens_hold_only_keys_of_their_list() -> None:
    names, seqs = (
        PageCursor(1, "", "names", max_page_size=MAX_PAGE_SIZE),
        PageCursor(1, "", "seqs", int, max_page_size=MAX_PAGE_SIZE),
    )
    _, name_token = names.page([{"k": "a"}, {"k": "b"}], "k")
    _, seq_token = seqs.page([{"k": 7}, {"k": 8}], "k")
    assert PageCursor(1, seq_token, "seqs", int, max_page_size=MAX_PAGE_SIZE).after == 7
    for token, query, key in ((name_token, "seqs", int), (seq_token, "names", str)):
        with pytest.raises(InvalidArgument) as caught:
            PageCursor(1, token, query, key, max_page_size=MAX_PAGE_SIZE)
        assert caught.value.violations[0].field == "page_token"


def test_the_endpoint_allow_list_reads_hosts_as_resolvers_do() -> None:
    allow = EndpointAllowList.parse(["127.0.0.0/8", "::1/128", "*.svc.cluster.local", "Orchestrator."])
    for host in ("127.0.0.1", "127.1", "2130706433", "[::1]", "a.b.svc.cluster.local", "ORCHESTRATOR"):
        assert allow.refusal(host) is None, host
    for host in ("10.0.0.1", "svc.cluster.local", "evil.com", "[::2]", "[not-v6]", "orchestrator-0"):
        assert allow.refusal(host) is not None, host
    everything = EndpointAllowList.parse(["0.0.0.0/0", "::/0", "*"])
    for host in (
        "169.254.169.254",
        "[fd00:ec2::254]",
        "metadata.google.internal",
        "[fe80::1]",
        "0251.0376.0251.0376",
    ):
        assert everything.refusal(host) is not None, host
    with pytest.raises(ValueError, match="neither"):
        EndpointAllowList.parse(["orchestrator:50053"])


def test_readiness_needs_the_share_of_endpoints_and_fails_only_when_every_reporter_says_so() -> None:
    from tensorway.registry.domain import ModelVersionState, TritonModelState, version_readiness

    def report(endpoint: str, state: ModelVersionState) -> TritonModelState:
        return TritonModelState(endpoint=endpoint, triton="t:1", state=state)

    endpoints = ("a:1", "b:1", "c:1")
    both = frozenset({"a:1", "b:1"})
    ready, loading, failed = ModelVersionState.READY, ModelVersionState.LOADING, ModelVersionState.FAILED
    assert version_readiness("1", "p", endpoints, frozenset(), ()).state is ModelVersionState.UNSPECIFIED
    assert version_readiness("1", "p", endpoints, both, ()).state is loading
    one_ready = version_readiness("1", "p", endpoints, both, [report("a:1", ready)])
    assert (one_ready.state, one_ready.ready_endpoints, one_ready.required_endpoints) == (ready, 1, 1)
    two_thirds = version_readiness("1", "p", endpoints, both, [report("a:1", ready)], min_ready_share=0.6)
    assert (two_thirds.state, two_thirds.required_endpoints) == (loading, 2)
    half_failed = version_readiness("1", "p", endpoints, both, [report("a:1", failed)])
    assert half_failed.state is loading
    all_failed = version_readiness("1", "p", endpoints, both, [report("a:1", failed), report("b:1", failed)])
    assert all_failed.state is failed
    warming = version_readiness("1", "p", endpoints, both, [report("a:1", ModelVersionState.WARMING)])
    assert warming.state is ModelVersionState.WARMING
