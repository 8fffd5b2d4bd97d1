"""Models and their versions in PostgreSQL: row mapping, reads at a revision, and the writes
of a transaction."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, LiteralString

from psycopg.types.json import Jsonb

from tensorway.registry.domain import (
    MODEL,
    MODEL_VERSION,
    Model,
    ModelFilter,
    ModelVersion,
    ModelVersionFilter,
    Page,
    Stage,
    Versioned,
)
from tensorway.registry.rows import MAX_PAGE_SIZE, Rows, row_version, stored_from_row
from tensorway.runtime import NotFound
from tensorway.runtime.postgres import PageCursor
from tensorway.tensors.signatures import TensorSpec


def _specs(items: Iterable[Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(item["name"], item["datatype"], tuple(item["shape"])) for item in items)


def _specs_json(specs: Iterable[TensorSpec]) -> Jsonb:
    return Jsonb([{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs])


def model_from_row(row: Mapping[str, Any]) -> Model:
    return Model(
        name=row["name"],
        description=row["description"],
        labels=row["labels"],
        **stored_from_row(row),
    )


def version_from_row(row: Mapping[str, Any]) -> ModelVersion:
    return ModelVersion(
        model=row["model"],
        version=row["version"],
        platform=row["platform"],
        inputs=_specs(row["inputs"]),
        outputs=_specs(row["outputs"]),
        max_batch_size=row["max_batch_size"],
        artifact_uri=row.get("artifact_uri", ""),
        stage=Stage(row.get("stage", Stage.DRAFT.value)),
        metrics=row.get("metrics", {}),
        **stored_from_row(row),
    )


def _model_params(model: Model) -> dict[str, Any]:
    return {"name": model.name, "description": model.description, "labels": Jsonb(dict(model.labels))}


def _version_params(version: ModelVersion) -> dict[str, Any]:
    return {
        "model": version.model,
        "version": version.version,
        "platform": version.platform,
        "inputs": _specs_json(version.inputs),
        "outputs": _specs_json(version.outputs),
        "max_batch_size": version.max_batch_size,
        "artifact_uri": version.artifact_uri,
        "stage": version.stage.value,
        "metrics": Jsonb(dict(version.metrics)),
    }


class ModelReads(Rows):
    """Models and versions as the cache loads them, each with the revision it was read at."""

    async def get_model(self, name: str) -> Versioned[Model]:
        return await self._at_revision(
            "SELECT * FROM models, registry_revision r WHERE name = %(name)s",
            {"name": name},
            (MODEL, f"models/{name}"),
            model_from_row,
        )

    async def list_models(self, where: ModelFilter, page_size: int, page_token: str) -> Page[Model]:
        cursor = PageCursor(
            page_size,
            page_token,
            json.dumps(["models", sorted(where.labels.items())]),
            max_page_size=MAX_PAGE_SIZE,
        )
        return await self._page(
            "SELECT * FROM models WHERE labels @> %(labels)s"
            " AND (%(after)s::text IS NULL OR name > %(after)s) ORDER BY name LIMIT %(limit)s",
            {"labels": Jsonb(dict(where.labels))},
            cursor,
            key="name",
            from_row=model_from_row,
        )

    async def get_model_version(self, model: str, version: str) -> Versioned[ModelVersion]:
        return await self._at_revision(
            "SELECT * FROM model_versions, registry_revision r"
            " WHERE model = %(model)s AND version = %(version)s",
            {"model": model, "version": version},
            (MODEL_VERSION, f"models/{model}/versions/{version}"),
            version_from_row,
        )

    async def list_model_versions(
        self, model: str, where: ModelVersionFilter, page_size: int, page_token: str
    ) -> Page[ModelVersion]:
        query = json.dumps(["versions", model, where.stage and where.stage.value, where.platform])
        cursor = PageCursor(page_size, page_token, query, int, max_page_size=MAX_PAGE_SIZE)
        return await self._page(
            "SELECT * FROM model_versions WHERE model = %(model)s"
            " AND (%(stage)s::text IS NULL OR stage = %(stage)s)"
            " AND (%(platform)s::text IS NULL OR platform = %(platform)s)"
            " AND (%(after)s::bigint IS NULL OR seq > %(after)s) ORDER BY seq LIMIT %(limit)s",
            {"model": model, "stage": where.stage and where.stage.value, "platform": where.platform},
            cursor,
            key="seq",
            from_row=version_from_row,
            parent=lambda: self.get_model(model),
        )


class ModelWrites(Rows):
    """Models and versions inside a write transaction."""

    async def get_model(self, name: str, *, lock: bool = False) -> Model:
        """The model; with `lock`, locked until commit. Writes to a model's versions and
        deployments take that lock first, so rules that span rows (deployments route only to
        versions that may be routed to) hold under concurrency."""
        query: LiteralString = (
            "SELECT * FROM models WHERE name = %(name)s FOR UPDATE"
            if lock
            else "SELECT * FROM models WHERE name = %(name)s"
        )
        return model_from_row(await self._found(query, {"name": name}, (MODEL, f"models/{name}")))

    async def insert_model(self, model: Model) -> Model:
        row = await self._inserted(
            "INSERT INTO models (name, description, labels)"
            " VALUES (%(name)s, %(description)s, %(labels)s) RETURNING *",
            _model_params(model),
            (MODEL, f"models/{model.name}"),
        )
        return model_from_row(row)

    async def update_model(self, model: Model, read: Model) -> Model:
        row = await self._over_read(
            "UPDATE models SET description = %(description)s, labels = %(labels)s, update_time = now(),"
            " row_version = row_version + 1 WHERE name = %(name)s AND row_version = %(read)s"
            " RETURNING *",
            {**_model_params(model), "read": row_version(read.etag)},
            f"models/{model.name}",
        )
        return model_from_row(row)

    async def delete_model(self, model: Model) -> tuple[list[str], list[str]]:
        """Deletes the model, its versions and deployments; returns the version and deployment ids."""
        versions = await self._all(
            "SELECT version FROM model_versions WHERE model = %(m)s", {"m": model.name}
        )
        deployments = await self._all("SELECT name FROM deployments WHERE model = %(m)s", {"m": model.name})
        await self._over_read(
            "DELETE FROM models WHERE name = %(name)s AND row_version = %(read)s RETURNING name",
            {"name": model.name, "read": row_version(model.etag)},
            f"models/{model.name}",
        )
        return [r["version"] for r in versions], [r["name"] for r in deployments]

    async def get_model_version(self, model: str, version: str) -> ModelVersion:
        versions = await self.model_versions(model, [version])
        if version not in versions:
            raise NotFound(MODEL_VERSION, f"models/{model}/versions/{version}")
        return versions[version]

    async def model_versions(
        self, model: str, versions: Iterable[str] | None = None
    ) -> dict[str, ModelVersion]:
        """The model's versions by id: all of them, or those of `versions` that exist."""
        rows = await self._all(
            "SELECT * FROM model_versions WHERE model = %(model)s"
            " AND (%(versions)s::text[] IS NULL OR version = ANY(%(versions)s)) ORDER BY seq",
            {"model": model, "versions": None if versions is None else list(versions)},
        )
        return {row["version"]: version_from_row(row) for row in rows}

    async def next_version_id(self, model: str) -> str:
        row = await self._one(
            "SELECT coalesce(max(version::bigint) FILTER (WHERE version ~ '^[0-9]{1,18}$'), 0) + 1 AS next"
            " FROM model_versions WHERE model = %(model)s",
            {"model": model},
        )
        assert row is not None
        return str(row["next"])

    async def insert_model_version(self, version: ModelVersion) -> ModelVersion:
        row = await self._inserted(
            "INSERT INTO model_versions (model, version, platform, inputs, outputs, max_batch_size,"
            " artifact_uri, stage, metrics) VALUES (%(model)s, %(version)s, %(platform)s, %(inputs)s,"
            " %(outputs)s, %(max_batch_size)s, %(artifact_uri)s, %(stage)s, %(metrics)s)"
            " RETURNING *",
            _version_params(version),
            (MODEL_VERSION, f"models/{version.model}/versions/{version.version}"),
        )
        return version_from_row(row)

    async def update_model_version(self, version: ModelVersion, read: ModelVersion) -> ModelVersion:
        row = await self._over_read(
            "UPDATE model_versions SET platform = %(platform)s, inputs = %(inputs)s, outputs = %(outputs)s,"
            " max_batch_size = %(max_batch_size)s, artifact_uri = %(artifact_uri)s, stage = %(stage)s,"
            " metrics = %(metrics)s, update_time = now(), row_version = row_version + 1"
            " WHERE model = %(model)s AND version = %(version)s AND row_version = %(read)s"
            " RETURNING *",
            {**_version_params(version), "read": row_version(read.etag)},
            f"models/{version.model}/versions/{version.version}",
        )
        return version_from_row(row)

    async def delete_model_version(self, version: ModelVersion) -> None:
        await self._over_read(
            "DELETE FROM model_versions WHERE model = %(model)s AND version = %(version)s"
            " AND row_version = %(read)s RETURNING version",
            {"model": version.model, "version": version.version, "read": row_version(version.etag)},
            f"models/{version.model}/versions/{version.version}",
        )
