"""What a job writes: one result part per shard under a deterministic key, row errors beside it,
and, when the job ends, the merged errors object and a manifest of parts, row counts, SHA-256
sums and presigned GET URLs.

Layout under the job's output prefix:
    parts/part-00000.jsonl    {"id": ..., "outputs": {"name": [...]}} per answered row, or
    parts/part-00000.parquet  every row: the id, a column per output and an error column
    errors/part-00000.jsonl   {"id": ..., "row": n, "reason": "..."} per failed row of shard 0
    errors.jsonl              every failed row of the job
    manifest.json             the job's parts and objects
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
import pyarrow as pa

from tensorway.batch.domain import (
    Job,
    JobState,
    ObjectRef,
    OutputFormat,
    RowError,
    ShardOutcome,
    ShardPlan,
    StoredObject,
)
from tensorway.batch.job_store import JobStore, ShardRecord
from tensorway.batch.object_store import ObjectStore
from tensorway.batch.parquet import DEFAULT_ID_COLUMN, AnsweredRows, parquet_bytes, part_table
from tensorway.batch.tensors import json_rows
from tensorway.tensors.signatures import TensorSpec

logger = logging.getLogger(__name__)
JSONL = "application/x-ndjson"
PARQUET = "application/vnd.apache.parquet"


def _prefix(job: Job) -> ObjectRef:
    return ObjectRef.parse(job.spec.output_prefix)


def part_ref(job: Job, shard: int) -> ObjectRef:
    return _prefix(job).child(f"parts/part-{shard:05d}{job.spec.output_format.extension}")


def shard_errors_ref(job: Job, shard: int) -> ObjectRef:
    return _prefix(job).child(f"errors/part-{shard:05d}.jsonl")


def errors_ref(job: Job) -> ObjectRef:
    return _prefix(job).child("errors.jsonl")


def manifest_ref(job: Job) -> ObjectRef:
    return _prefix(job).child("manifest.json")


# One encoder for every line: json.dumps with options builds a new one each call.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def json_text(value: Any) -> bytes:
    """Compact JSON for a value a job writes."""
    try:
        # Five times faster than the standard library's encoder, which output lines made the
        # worker's largest cost.
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        # orjson refuses integers beyond 64 bits, which a JSONL row's id may be.
        return _compact_json(value).encode()


def jsonl(items: Iterable[Any]) -> bytes:
    return b"".join([json_text(item) + b"\n" for item in items])


def answer_lines(ids: Sequence[Any], outputs: Mapping[str, Sequence[bytes]]) -> list[bytes]:
    """A part's lines for rows with these ids, from each output's rows as JSON text."""
    # The names are encoded once per batch; each row only splices its values in.
    names = b",".join(json_text(name).replace(b"%", b"%%") + b":%b" for name in outputs)
    line = b'{"id":%b,"outputs":{' + names + b"}}\n"
    return [
        line % (json_text(row_id), *values) for row_id, *values in zip(ids, *outputs.values(), strict=True)
    ]


def _json_id(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


@dataclass(frozen=True)
class ShardAnswers:
    """A shard's outcome before it is written: the answered rows in row order, the row errors,
    and the ids of every row when the input held them as a column (Parquet)."""

    answered: list[AnsweredRows]
    errors: list[RowError]
    ids: pa.Array | None = None

    @property
    def rows_done(self) -> int:
        return sum(len(piece.rows) for piece in self.answered)


def jsonl_part(answers: ShardAnswers) -> bytes:
    """A JSONL part: a line per answered row."""
    lines: list[bytes] = []
    for piece in answers.answered:
        ids = piece.ids.to_pylist() if isinstance(piece.ids, pa.Array) else [_json_id(i) for i in piece.ids]
        lines.extend(answer_lines(ids, {name: json_rows(array) for name, array in piece.outputs.items()}))
    return b"".join(lines)


@dataclass(frozen=True)
class PresignedObject:
    """A stored object with a URL that reads it without credentials."""

    stored: StoredObject
    url: str


def final_state(job: Job) -> tuple[JobState, str]:
    """The state a job whose shards have all finished ends in, and the reason when it failed."""
    progress = job.progress
    if progress.rows_failed == 0:
        return JobState.SUCCEEDED, ""
    if progress.rows_done == 0:
        return JobState.FAILED, f"every one of the {progress.rows_failed} rows failed; see the errors object"
    return JobState.PARTIALLY_FAILED, ""


class ResultWriter:
    """Writes shard results and finished jobs' manifests; presigns their URLs."""

    def __init__(self, objects: ObjectStore, url_expiry: timedelta) -> None:
        self._objects = objects
        self._url_expiry = url_expiry

    async def write_shard(
        self, job: Job, shard: ShardPlan, answers: ShardAnswers, outputs: Sequence[TensorSpec]
    ) -> ShardOutcome:
        """Store a shard's part (and its row errors, if any) under the shard's fixed keys, so a
        second attempt replaces the first instead of adding to it: the same rows give the same
        bytes, in either format."""
        ref = part_ref(job, shard.index)
        errors = answers.errors
        if job.spec.output_format is OutputFormat.PARQUET:
            id_name = job.spec.id_column or DEFAULT_ID_COLUMN

            def encode() -> bytes:
                table = part_table(
                    shard.row_start,
                    shard.row_count,
                    answered=answers.answered,
                    errors=errors,
                    ids=answers.ids,
                    id_name=id_name,
                    outputs=outputs,
                )
                return parquet_bytes(table)

            # pyarrow encodes without the GIL, beside the other shards' inference.
            data = await asyncio.to_thread(encode)
            result = StoredObject(ref.uri, shard.row_count, await self._objects.write(ref, data, PARQUET))
        else:
            # In a thread, so that the event loop keeps other shards' requests going meanwhile.
            data = await asyncio.to_thread(jsonl_part, answers)
            result = StoredObject(ref.uri, answers.rows_done, await self._objects.write(ref, data, JSONL))
        failed: StoredObject | None = None
        if errors:
            ref = shard_errors_ref(job, shard.index)
            data = jsonl(e.to_json() for e in errors)
            failed = StoredObject(ref.uri, len(errors), await self._objects.write(ref, data, JSONL))
        return ShardOutcome(
            result=result, errors=failed, rows_done=answers.rows_done, rows_failed=len(errors)
        )

    async def discard_shard(self, job: Job, shard: int) -> None:
        """Remove what an attempt wrote for a shard that was cancelled meanwhile."""
        await self._objects.delete(part_ref(job, shard))
        await self._objects.delete(shard_errors_ref(job, shard))

    def presign(self, stored: StoredObject) -> PresignedObject:
        return PresignedObject(stored, self._objects.presign(stored.uri, self._url_expiry))

    async def finalize(self, store: JobStore, job_id: str) -> JobState | None:
        """End a running job whose shards have all finished: merge the errors, write the
        manifest and record the final state. None when the job is not (or no longer) ready, or
        another finalizer holds it."""
        async with store.job_to_finalize(job_id) as claimed:
            if claimed is None:
                return None
            connection, job, shards = claimed
            state, reason = final_state(job)
            errors = await self._merge_errors(job, shards) if job.progress.rows_failed else None
            manifest = await self._write_manifest(job, state, [s.result for s in shards if s.result], errors)
            await store.finish_job(
                connection,
                job_id=job.id,
                state=state,
                failure_reason=reason,
                manifest=manifest,
                errors=errors,
            )
        logger.info("job finished", extra={"job": job.name, "state": state.value})
        return state

    async def _merge_errors(self, job: Job, shards: Sequence[ShardRecord]) -> StoredObject:
        chunks: list[bytes] = []
        for shard in shards:
            if shard.errors is not None:
                chunks.append(await self._objects.read(ObjectRef.parse(shard.errors.uri)))
            elif shard.state == "FAILED":
                # The shard never got through; its rows are named by position.
                chunks.append(
                    jsonl(
                        RowError(
                            row=row, id=row, reason=f"shard {shard.plan.index} failed: {shard.last_error}"
                        ).to_json()
                        for row in range(shard.plan.row_start, shard.plan.row_start + shard.plan.row_count)
                    )
                )
        data = b"".join(chunks)
        ref = errors_ref(job)
        return StoredObject(ref.uri, job.progress.rows_failed, await self._objects.write(ref, data, JSONL))

    async def _write_manifest(
        self, job: Job, state: JobState, parts: Sequence[StoredObject], errors: StoredObject | None
    ) -> StoredObject:
        def entry(stored: StoredObject) -> dict[str, Any]:
            return {**stored.to_json(), "url": self.presign(stored).url}

        manifest = {
            "job": job.name,
            "model": job.spec.model,
            "model_version": job.spec.model_version,
            "input_uri": job.spec.input_uri,
            "output_format": job.spec.output_format.value,
            "state": state.value,
            "rows_total": job.progress.rows_total,
            "rows_done": job.progress.rows_done,
            "rows_failed": job.progress.rows_failed,
            "url_expiry_seconds": int(self._url_expiry.total_seconds()),
            "parts": [entry(p) for p in parts],
            "errors": entry(errors) if errors else None,
        }
        ref = manifest_ref(job)
        data = json.dumps(manifest, indent=2).encode()
        # The manifest's rows are the answered rows its parts hold.
        written = await self._objects.write(ref, data, "application/json")
        return StoredObject(ref.uri, job.progress.rows_done, written)
