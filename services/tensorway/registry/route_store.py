"""Routes from PostgreSQL: each model's deployments, versions, pools, members and readiness
reports read in one statement, and built into the route the routers get."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, LiteralString

from tensorway.registry.deployment_store import deployment_from_row
from tensorway.registry.domain import (
    DEFAULT_MIN_READY_SHARE,
    Deployment,
    ModelVersion,
    ModelVersionState,
    Route,
    TritonModelState,
    Versioned,
    VersionRoute,
    build_route,
)
from tensorway.registry.model_store import version_from_row
from tensorway.registry.rows import Rows

# One statement, so the routes and the revision they belong to come from one snapshot.
ROUTES_QUERY = """
SELECT r.revision,
  (SELECT coalesce(jsonb_agg(jsonb_build_object(
      'model', d.model, 'name', d.name, 'pool', d.pool, 'traffic', d.traffic,
      'aliases', d.aliases, 'shadow', d.shadow, 'endpoints', p.endpoints, 'members', {members})
      ORDER BY d.model, d.name), '[]')
   FROM deployments d JOIN pools p ON p.name = d.pool {deployments_of}) AS deployments,
  (SELECT coalesce(jsonb_agg(jsonb_build_object(
      'model', v.model, 'version', v.version, 'platform', v.platform, 'inputs', v.inputs,
      'outputs', v.outputs, 'max_batch_size', v.max_batch_size, 'artifact_uri', v.artifact_uri)), '[]')
   FROM model_versions v
   WHERE v.stage <> 'ARCHIVED' AND EXISTS (SELECT 1 FROM deployments d WHERE d.model = v.model)
   {versions_of}) AS versions,
  (SELECT coalesce(jsonb_agg(jsonb_build_object(
      'pool', s.pool, 'endpoint', s.endpoint, 'model', s.model, 'version', s.version,
      'triton', s.triton, 'state', s.state, 'reason', s.reason, 'update_time', s.update_time)
      ORDER BY s.endpoint, s.triton), '[]')
   FROM model_version_states s {states_of}) AS states,
  (SELECT coalesce(jsonb_agg(jsonb_build_object('pool', m.pool, 'endpoint', m.endpoint)), '[]')
   FROM model_state_reporters m) AS reporters
FROM registry_revision r
"""
# A pool's members that it does not also list by hand: the endpoints of its routes are both.
POOL_MEMBERS: LiteralString = """coalesce((SELECT jsonb_agg(m.endpoint ORDER BY m.endpoint)
      FROM pool_members m WHERE m.pool = p.name AND NOT p.endpoints ? m.endpoint), '[]')"""
ROUTE_OF_MODEL: LiteralString = ROUTES_QUERY.format(
    members=POOL_MEMBERS,
    deployments_of="WHERE d.model = %(model)s",
    versions_of="AND v.model = %(model)s",
    states_of="WHERE s.model = %(model)s",
)
ALL_ROUTES: LiteralString = ROUTES_QUERY.format(
    members=POOL_MEMBERS, deployments_of="", versions_of="", states_of=""
)


def routes_from_row(
    row: Mapping[str, Any], min_ready_share: float = DEFAULT_MIN_READY_SHARE
) -> dict[str, Route]:
    """Routes by model from a ROUTES_QUERY row."""
    reporters: dict[str, set[str]] = {}
    for item in row.get("reporters", ()):
        reporters.setdefault(item["pool"], set()).add(item["endpoint"])
    states: dict[str, dict[tuple[str, str], list[TritonModelState]]] = {}
    for item in row.get("states", ()):
        states.setdefault(item["model"], {}).setdefault((item["version"], item["pool"]), []).append(
            TritonModelState(
                endpoint=item["endpoint"],
                triton=item["triton"],
                state=ModelVersionState(item["state"]),
                reason=item["reason"],
                update_time=datetime.fromisoformat(item["update_time"]),
            )
        )
    frozen_reporters = {pool: frozenset(endpoints) for pool, endpoints in reporters.items()}
    deployments: dict[str, list[Deployment]] = {}
    endpoints: dict[str, tuple[str, ...]] = {}
    members: dict[str, frozenset[str]] = {}
    for item in row["deployments"]:
        deployments.setdefault(item["model"], []).append(deployment_from_row(item))
        endpoints[item["pool"]] = (*item["endpoints"], *item.get("members", ()))
        members[item["pool"]] = frozenset(item.get("members", ()))
    versions: dict[str, dict[str, ModelVersion]] = {}
    for item in row["versions"]:
        versions.setdefault(item["model"], {})[item["version"]] = version_from_row(item)
    routes = {}
    for model, its_deployments in deployments.items():
        route = build_route(
            model,
            its_deployments,
            endpoints,
            versions.get(model, {}),
            frozen_reporters,
            states.get(model, {}),
            min_ready_share,
        )
        if route is not None:
            routes[model] = _members_serve_when_ready(route, members)
    return routes


def _members_serve_when_ready(route: Route, members: Mapping[str, frozenset[str]]) -> Route:
    """The route with each version sent only to the pool members that report it ready, beside
    the endpoints set by hand: an orchestrator that just joined gets a version's traffic once it
    has fetched, loaded and warmed it. Members of a pool that reports no states all serve."""

    def serving(version: VersionRoute) -> VersionRoute:
        joined = members.get(version.pool, frozenset())
        readiness = version.readiness
        if not joined or readiness is None or readiness.state is ModelVersionState.UNSPECIFIED:
            return version
        ready = {t.endpoint for t in readiness.tritons if t.state is ModelVersionState.READY}
        return replace(
            version, endpoints=tuple(e for e in version.endpoints if e not in joined or e in ready)
        )

    return replace(route, versions=tuple(serving(version) for version in route.versions))


class RouteReads(Rows):
    """Routes at the revision they were read at."""

    min_ready_share: float
    """The share of a pool's endpoints that must have a version ready before its route gives
    it traffic."""

    async def load_route(self, model: str) -> Versioned[Route | None]:
        """The model's route now (None when nothing is deployed) and the revision it is at."""
        row = await self._one(ROUTE_OF_MODEL, {"model": model})
        assert row is not None  # registry_revision always has its row
        return Versioned(routes_from_row(row, self.min_ready_share).get(model), row["revision"])

    async def load_routes(self) -> Versioned[dict[str, Route]]:
        """The whole route table and the revision it is at."""
        row = await self._one(ALL_ROUTES, {})
        assert row is not None
        return Versioned(routes_from_row(row, self.min_ready_share), row["revision"])
