"""Deployments in PostgreSQL: row mapping, reads at a revision, and the writes of a
transaction."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from psycopg.types.json import Jsonb

from tensorway.registry.domain import DEPLOYMENT, Deployment, Page, Shadow, TrafficSplit, Versioned
from tensorway.registry.model_store import ModelReads
from tensorway.registry.rows import MAX_PAGE_SIZE, Rows, row_version, stored_from_row
from tensorway.runtime.postgres import PageCursor


def deployment_from_row(row: Mapping[str, Any]) -> Deployment:
    shadow = row["shadow"]
    return Deployment(
        model=row["model"],
        name=row["name"],
        pool=row["pool"],
        traffic=tuple(TrafficSplit(item["version"], item["weight"]) for item in row["traffic"]),
        aliases=row["aliases"],
        shadow=None if shadow is None else Shadow(shadow["version"], shadow["percent"]),
        **stored_from_row(row),
    )


def _deployment_params(deployment: Deployment) -> dict[str, Any]:
    shadow = deployment.shadow
    return {
        "model": deployment.model,
        "name": deployment.name,
        "pool": deployment.pool,
        "traffic": Jsonb([{"version": s.version, "weight": s.weight} for s in deployment.traffic]),
        "aliases": Jsonb(dict(deployment.aliases)),
        "shadow": None if shadow is None else Jsonb({"version": shadow.version, "percent": shadow.percent}),
    }


class DeploymentReads(ModelReads):
    """Deployments as the cache loads them, each with the revision it was read at; a model's
    list of them needs the model to exist."""

    async def get_deployment(self, model: str, name: str) -> Versioned[Deployment]:
        return await self._at_revision(
            "SELECT * FROM deployments, registry_revision r WHERE model = %(model)s AND name = %(name)s",
            {"model": model, "name": name},
            (DEPLOYMENT, f"models/{model}/deployments/{name}"),
            deployment_from_row,
        )

    async def list_deployments(self, model: str, page_size: int, page_token: str) -> Page[Deployment]:
        cursor = PageCursor(
            page_size, page_token, json.dumps(["deployments", model]), max_page_size=MAX_PAGE_SIZE
        )
        return await self._page(
            "SELECT * FROM deployments WHERE model = %(model)s"
            " AND (%(after)s::text IS NULL OR name > %(after)s) ORDER BY name LIMIT %(limit)s",
            {"model": model},
            cursor,
            key="name",
            from_row=deployment_from_row,
            parent=lambda: self.get_model(model),
        )


class DeploymentWrites(Rows):
    """Deployments inside a write transaction."""

    async def get_deployment(self, model: str, name: str) -> Deployment:
        row = await self._found(
            "SELECT * FROM deployments WHERE model = %(model)s AND name = %(name)s",
            {"model": model, "name": name},
            (DEPLOYMENT, f"models/{model}/deployments/{name}"),
        )
        return deployment_from_row(row)

    async def deployments_of(self, model: str) -> list[Deployment]:
        rows = await self._all(
            "SELECT * FROM deployments WHERE model = %(model)s ORDER BY name",
            {"model": model},
        )
        return [deployment_from_row(row) for row in rows]

    async def insert_deployment(self, deployment: Deployment) -> Deployment:
        row = await self._inserted(
            "INSERT INTO deployments (model, name, pool, traffic, aliases, shadow) VALUES"
            " (%(model)s, %(name)s, %(pool)s, %(traffic)s, %(aliases)s, %(shadow)s)"
            " RETURNING *",
            _deployment_params(deployment),
            (DEPLOYMENT, f"models/{deployment.model}/deployments/{deployment.name}"),
        )
        return deployment_from_row(row)

    async def update_deployment(self, deployment: Deployment, read: Deployment) -> Deployment:
        row = await self._over_read(
            "UPDATE deployments SET pool = %(pool)s, traffic = %(traffic)s, aliases = %(aliases)s,"
            " shadow = %(shadow)s, update_time = now(), row_version = row_version + 1"
            " WHERE model = %(model)s AND name = %(name)s AND row_version = %(read)s"
            " RETURNING *",
            {**_deployment_params(deployment), "read": row_version(read.etag)},
            f"models/{deployment.model}/deployments/{deployment.name}",
        )
        return deployment_from_row(row)

    async def delete_deployment(self, deployment: Deployment) -> None:
        await self._over_read(
            "DELETE FROM deployments WHERE model = %(model)s AND name = %(name)s AND row_version = %(read)s"
            " RETURNING name",
            {"model": deployment.model, "name": deployment.name, "read": row_version(deployment.etag)},
            f"models/{deployment.model}/deployments/{deployment.name}",
        )
