"""The registry's domain: models, versions, pools, deployments and the routes built from them.

Identifiers here are ids ("digits", "3"), not resource names ("models/digits/versions/3"):
resource names belong to the API and live in the converters.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from tensorway.tensors.signatures import TensorSpec

T = TypeVar("T")

MODEL = "tensorway.registry.v1.Model"
MODEL_VERSION = "tensorway.registry.v1.ModelVersion"
POOL = "tensorway.registry.v1.Pool"
DEPLOYMENT = "tensorway.registry.v1.Deployment"

PRODUCTION_ALIAS = "production"


class Stage(enum.Enum):
    """Where a model version is in its lifecycle."""

    DRAFT = "DRAFT"
    STAGING = "STAGING"
    PRODUCTION = "PRODUCTION"
    ARCHIVED = "ARCHIVED"


class ModelVersionState(enum.Enum):
    """Where a model version stands on one Triton, or, aggregated, on its pool. UNSPECIFIED
    means no orchestrator of the pool reports states: the version is routed as it is."""

    UNSPECIFIED = "UNSPECIFIED"
    LOADING = "LOADING"
    WARMING = "WARMING"
    READY = "READY"
    FAILED = "FAILED"

    @property
    def routable(self) -> bool:
        """Whether a version in this state may get traffic by weight."""
        return self in (ModelVersionState.UNSPECIFIED, ModelVersionState.READY)


DEFAULT_MIN_READY_SHARE = 0.0
"""Share of a pool's endpoints that must have a version ready before it gets traffic; whatever
the share, at least one."""


@dataclass(frozen=True)
class TritonModelState:
    """A model version's state on one Triton, as one orchestrator of the pool reported it."""

    endpoint: str
    triton: str
    state: ModelVersionState
    reason: str = ""
    update_time: datetime | None = None


@dataclass(frozen=True)
class ModelStateReport:
    """One line of an orchestrator's report: a model version's state on one of its Tritons."""

    model: str
    version: str
    triton: str
    state: ModelVersionState
    reason: str = ""


@dataclass(frozen=True)
class VersionReadiness:
    """A version's readiness on one pool, from its orchestrators' reports."""

    version: str
    pool: str
    state: ModelVersionState
    ready_endpoints: int = 0
    required_endpoints: int = 0
    tritons: tuple[TritonModelState, ...] = ()


def version_readiness(  # noqa: PLR0917 - the readiness of one (version, pool) is all of these
    version: str,
    pool: str,
    endpoints: Sequence[str],
    reporters: frozenset[str],
    reports: Sequence[TritonModelState],
    min_ready_share: float = DEFAULT_MIN_READY_SHARE,
) -> VersionReadiness:
    """The version's readiness on `pool`: READY once `min_ready_share` of the pool's endpoints
    (at least one) have it ready on some Triton; FAILED when every reporting endpoint has
    reported it and every report is FAILED; LOADING or WARMING in between. UNSPECIFIED when no
    orchestrator of the pool reports (`reporters` is empty): such a pool is routed as before."""
    members = set(endpoints) or set(reporters)
    required = max(1, math.ceil(min_ready_share * len(members) - 1e-9))
    if not reporters:
        return VersionReadiness(version, pool, ModelVersionState.UNSPECIFIED, 0, required, tuple(reports))
    ready = {report.endpoint for report in reports if report.state is ModelVersionState.READY}
    states = {report.state for report in reports}
    if len(ready) >= required:
        state = ModelVersionState.READY
    elif states == {ModelVersionState.FAILED} and reporters <= {report.endpoint for report in reports}:
        state = ModelVersionState.FAILED
    elif ModelVersionState.WARMING in states:
        state = ModelVersionState.WARMING
    else:
        state = ModelVersionState.LOADING
    return VersionReadiness(version, pool, state, len(ready), required, tuple(reports))


@dataclass(frozen=True, kw_only=True)
class Stored:
    """What the registry keeps with every resource it stores: when it was created and last
    updated, and the etag a write over it must match (keyword-only, after its own fields)."""

    create_time: datetime | None = None
    update_time: datetime | None = None
    etag: str = ""


@dataclass(frozen=True)
class Model(Stored):
    """A name that clients infer against."""

    name: str
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelVersion(Stored):
    """One version of a model: what it takes, what it returns, where its artifact is."""

    model: str
    version: str
    platform: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_batch_size: int = 0
    artifact_uri: str = ""
    stage: Stage = Stage.DRAFT
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Pool(Stored):
    """Orchestrator endpoints beside one group of Tritons."""

    name: str
    endpoints: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrafficSplit:
    """A version's percent of a deployment's traffic."""

    version: str
    weight: int


@dataclass(frozen=True)
class Shadow:
    """A version that receives a copy of `percent` of the requests."""

    version: str
    percent: int


@dataclass(frozen=True)
class Deployment(Stored):
    """Which versions of a model a pool serves, and how traffic is split between them."""

    model: str
    name: str
    pool: str = ""
    traffic: tuple[TrafficSplit, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    shadow: Shadow | None = None

    def referenced_versions(self) -> set[str]:
        """Every version the deployment routes to: by weight (even 0), by alias or as shadow."""
        versions = {split.version for split in self.traffic} | set(self.aliases.values())
        if self.shadow is not None:
            versions.add(self.shadow.version)
        return versions


@dataclass(frozen=True)
class VersionRoute:
    """One routable version: its share of traffic, its pool and what routers need to serve it."""

    version: str
    weight: int
    pool: str
    endpoints: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    platform: str
    artifact_uri: str = ""
    readiness: VersionReadiness | None = None

    @property
    def state(self) -> ModelVersionState:
        return ModelVersionState.UNSPECIFIED if self.readiness is None else self.readiness.state


@dataclass(frozen=True)
class Route:
    """How requests for one model are routed."""

    model: str
    versions: tuple[VersionRoute, ...]
    aliases: Mapping[str, str]
    shadow: Shadow | None


@dataclass(frozen=True)
class Resolution:
    """A resolved request: the model's route and the version chosen."""

    route: Route
    version: str


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list, and the opaque token of the next (empty on the last page)."""

    items: Sequence[T]
    next_page_token: str


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A value read from PostgreSQL and the registry revision it was read at."""

    value: T
    revision: int


@dataclass(frozen=True)
class Change:
    """A committed write: its registry revision, the models whose routes it may change, and
    the cache keys it makes stale."""

    revision: int
    models: frozenset[str]
    keys: frozenset[str]


@dataclass(frozen=True)
class RouteUpdate:
    """A change of the route table as watchers see it: the whole table when `snapshot`."""

    revision: int
    snapshot: bool
    routes: tuple[Route, ...]
    removed_models: tuple[str, ...]


@dataclass(frozen=True)
class ModelFilter:
    """ListModels' filter: every label must match."""

    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelVersionFilter:
    """ListModelVersions' filter: each field that is set must match."""

    stage: Stage | None = None
    platform: str | None = None


ROUTED_VERSION_FIELDS = ("inputs", "outputs", "max_batch_size", "platform", "artifact_uri")
"""What a route carries of each version it routes to, as the version holds it."""


def build_route(  # noqa: PLR0917 - the route's inputs, read from one snapshot
    model: str,
    deployments: Sequence[Deployment],
    endpoints: Mapping[str, tuple[str, ...]],
    versions: Mapping[str, ModelVersion],
    reporters: Mapping[str, frozenset[str]] | None = None,
    states: Mapping[tuple[str, str], Sequence[TritonModelState]] | None = None,
    min_ready_share: float = DEFAULT_MIN_READY_SHARE,
) -> Route | None:
    """The route of a model from its deployments (in name order), their pools' endpoints and
    its versions; None when nothing is deployed. `reporters` (pool → endpoints that report
    states) and `states` ((version, pool) → reports) give each version its readiness.

    A version served by several deployments on one pool appears once with their weights added.
    Writes keep aliases consistent and allow one shadow across a model's deployments.
    """
    if not deployments:
        return None
    weights: dict[tuple[str, str], int] = {}
    aliases: dict[str, str] = {}
    shadow: Shadow | None = None
    for deployment in deployments:
        pool_weights = {split.version: split.weight for split in deployment.traffic}
        for version in sorted(deployment.referenced_versions(), key=_version_order):
            key = (version, deployment.pool)
            weights[key] = weights.get(key, 0) + pool_weights.get(version, 0)
        aliases.update(deployment.aliases)
        shadow = shadow or deployment.shadow
    routes = []
    for (version, pool), weight in weights.items():
        spec = versions[version]
        routes.append(
            VersionRoute(
                version=version,
                weight=weight,
                pool=pool,
                endpoints=endpoints[pool],
                **{name: getattr(spec, name) for name in ROUTED_VERSION_FIELDS},
                readiness=version_readiness(
                    version,
                    pool,
                    endpoints[pool],
                    (reporters or {}).get(pool, frozenset()),
                    (states or {}).get((version, pool), ()),
                    min_ready_share,
                ),
            )
        )
    return Route(model=model, versions=tuple(routes), aliases=aliases, shadow=shadow)


def _version_order(version: str) -> tuple[int, str]:
    # Numeric ids in numeric order ("2" before "10"), then the others by name.
    return (int(version), "") if version.isdigit() else (2**63, version)
