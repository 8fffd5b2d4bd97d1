"""RouteTable and version choice: explicit versions, aliases, weights, sticky keys, deltas."""

from __future__ import annotations

import random
from collections import Counter

import grpc
import pytest

from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.router.routing import ModelRoute, RouteTable, key_point
from tensorway.runtime import NotFound


def route(model: str = "digits", weights: dict[str, int] | None = None, **aliases: str) -> registry_pb.Route:
    return registry_pb.Route(
        model=model,
        versions=[
            registry_pb.VersionRoute(version=version, weight=weight, endpoints=[f"{model}-{version}:1"])
            for version, weight in (weights or {"1": 90, "2": 10}).items()
        ],
        aliases=aliases,
    )


def test_a_90_10_split_holds_within_3_percent_over_5000_requests() -> None:
    digits = ModelRoute.from_proto(route())
    rng = random.Random(11)
    counts = Counter(digits.choose("", None, rng).version for _ in range(5000))
    assert abs(counts["2"] / 5000 - 0.10) <= 0.03
    assert counts["1"] + counts["2"] == 5000


def test_sticky_keys_always_land_on_one_version_and_split_by_weight() -> None:
    digits = ModelRoute.from_proto(route())
    rng = random.Random(12)
    chosen = {}
    for index in range(2000):
        key = f"user-{index}"
        versions = {digits.choose("", key, rng).version for _ in range(5)}
        assert len(versions) == 1
        chosen[key] = versions.pop()
    share = Counter(chosen.values())["2"] / len(chosen)
    assert abs(share - 0.10) <= 0.03


def test_key_points_are_stable_and_uniform() -> None:
    assert key_point("user-1") == key_point("user-1")
    points = [key_point(f"k{i}") for i in range(10000)]
    assert all(0 <= p < 1 for p in points)
    assert abs(sum(points) / len(points) - 0.5) < 0.02


def test_shifting_weight_moves_only_the_keys_in_the_ranges_that_changed() -> None:
    before = ModelRoute.from_proto(route(weights={"1": 90, "2": 10}))
    after = ModelRoute.from_proto(route(weights={"1": 80, "2": 20}))
    rng = random.Random(0)
    keys = [f"k{i}" for i in range(3000)]
    moved = [k for k in keys if before.choose("", k, rng).version != after.choose("", k, rng).version]
    assert all(before.choose("", k, rng).version == "1" for k in moved)  # only 1 → 2, never back
    assert abs(len(moved) / len(keys) - 0.10) <= 0.03


def test_explicit_versions_and_aliases_win_over_weights() -> None:
    digits = ModelRoute.from_proto(route(canary="2"))
    rng = random.Random(1)
    assert {digits.choose("2", "any-key", rng).version for _ in range(50)} == {"2"}
    assert digits.choose("canary", None, rng).version == "2"


def test_unknown_versions_and_models_are_not_found() -> None:
    table = RouteTable().apply(registry_pb.WatchRoutesResponse(revision=1, snapshot=True, routes=[route()]))
    with pytest.raises(NotFound) as raised:
        table.model("digits").choose("7", None, random.Random())
    assert raised.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFound):
        table.model("iris")


def test_without_weights_the_default_version_takes_the_traffic() -> None:
    digits = ModelRoute.from_proto(route(weights={"3": 0, "4": 0}))
    assert digits.choose("", None, random.Random()).version == "3"
    weighted = ModelRoute.from_proto(route(weights={"1": 10, "2": 90}))
    assert weighted.default().version == "2"


def test_snapshots_replace_and_deltas_change_the_table() -> None:
    table = RouteTable().apply(
        registry_pb.WatchRoutesResponse(revision=1, snapshot=True, routes=[route("digits"), route("iris")])
    )
    table = table.apply(
        registry_pb.WatchRoutesResponse(
            revision=2, routes=[route("simple", weights={"1": 100})], removed_models=["iris"]
        )
    )
    assert table.revision == 2
    assert sorted(table.models) == ["digits", "simple"]
    assert table.endpoints() == {"digits-1:1", "digits-2:1", "simple-1:1"}
    table = table.apply(registry_pb.WatchRoutesResponse(revision=3, snapshot=True, routes=[route("iris")]))
    assert sorted(table.models) == ["iris"]
