"""Routing by readiness: a version its pool has not made ready gets no traffic by weight."""

from __future__ import annotations

import random
from collections import Counter

from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.router.routing import ModelRoute

READY = registry_pb.MODEL_VERSION_STATE_READY
LOADING = registry_pb.MODEL_VERSION_STATE_LOADING
FAILED = registry_pb.MODEL_VERSION_STATE_FAILED
UNKNOWN = registry_pb.MODEL_VERSION_STATE_UNSPECIFIED


def route(states: dict[str, int]) -> ModelRoute:
    return ModelRoute.from_proto(
        registry_pb.Route(
            model="digits",
            versions=[
                registry_pb.VersionRoute(version=version, weight=50, endpoints=["o:1"], state=state)
                for version, state in states.items()
            ],
        )
    )


def chosen(model: ModelRoute, draws: int = 500) -> Counter[str]:
    rng = random.Random(5)
    return Counter(model.choose("", None, rng).version for _ in range(draws))


def test_a_version_that_is_loading_or_failed_leaves_its_share_to_the_ready_ones() -> None:
    assert chosen(route({"1": READY, "2": LOADING})) == Counter({"1": 500})
    assert chosen(route({"1": READY, "2": FAILED})) == Counter({"1": 500})


def test_pools_that_report_no_readiness_are_routed_as_before() -> None:
    counts = chosen(route({"1": UNKNOWN, "2": READY}))
    assert set(counts) == {"1", "2"}


def test_a_version_asked_for_by_name_runs_whatever_its_readiness() -> None:
    model = route({"1": READY, "2": LOADING})
    assert model.choose("2", None, random.Random(1)).version == "2"


def test_a_cut_over_to_a_version_still_loading_stays_on_the_ready_ones_without_weight() -> None:
    model = ModelRoute.from_proto(
        registry_pb.Route(
            model="digits",
            versions=[
                registry_pb.VersionRoute(version="1", weight=0, endpoints=["o:1"], state=READY),
                registry_pb.VersionRoute(version="2", weight=100, endpoints=["o:1"], state=LOADING),
            ],
        )
    )
    assert chosen(model) == Counter({"1": 500})
