"""Batch jobs and shards as PostgreSQL rows: the query that reads a job whole, and the mappers
from its rows to the domain's objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, LiteralString

from tensorway.batch.domain import (
    InputFormat,
    Job,
    JobSpec,
    JobState,
    NpyLayout,
    OutputFormat,
    Progress,
    ShardPlan,
    StoredObject,
)

# The results of a job are its done shards' objects, in shard order.
JOB_QUERY: LiteralString = """SELECT j.id, j.seq, j.tenant, j.model, j.model_version, j.input_uri,
    j.input_format, j.output_prefix, j.shard_size, j.priority, j.state, j.failure_reason,
    j.rows_total, j.rows_done, j.rows_failed, j.shards_total, j.shards_done, j.manifest, j.errors,
    j.trace_context, j.create_time, j.start_time, j.end_time, j.npy_layout,
    j.output_format, j.input_columns, j.id_column,
    (SELECT coalesce(jsonb_agg(s.result ORDER BY s.shard), '[]') FROM batch_shards s
     WHERE s.job_id = j.id AND s.result IS NOT NULL) AS results
    FROM batch_jobs j"""


def job_from_row(row: Mapping[str, Any]) -> Job:
    return Job(
        id=row["id"],
        tenant=row["tenant"],
        spec=JobSpec(
            model=row["model"],
            model_version=row["model_version"],
            input_uri=row["input_uri"],
            input_format=InputFormat(row["input_format"]),
            output_prefix=row["output_prefix"],
            shard_size=row["shard_size"],
            priority=row["priority"],
            output_format=OutputFormat(row["output_format"]),
            input_columns=tuple(sorted(row["input_columns"].items())),
            id_column=row["id_column"],
        ),
        state=JobState(row["state"]),
        progress=Progress(
            rows_total=row["rows_total"],
            rows_done=row["rows_done"],
            rows_failed=row["rows_failed"],
            shards_total=row["shards_total"],
            shards_done=row["shards_done"],
        ),
        create_time=row["create_time"],
        failure_reason=row["failure_reason"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        manifest=StoredObject.from_json(row["manifest"]) if row["manifest"] else None,
        results=tuple(StoredObject.from_json(r) for r in row.get("results") or ()),
        errors=StoredObject.from_json(row["errors"]) if row["errors"] else None,
        trace_context=row["trace_context"],
    )


def npy_layout_from_row(row: Mapping[str, Any]) -> NpyLayout | None:
    layout = row["npy_layout"]
    return NpyLayout(layout["dtype"], tuple(layout["row_shape"])) if layout else None


def shard_from_row(row: Mapping[str, Any]) -> ShardPlan:
    return ShardPlan(
        row["shard"],
        row["row_start"],
        row["row_count"],
        row["byte_start"],
        row["byte_end"],
        row["source"],
        row["source_row"],
    )
