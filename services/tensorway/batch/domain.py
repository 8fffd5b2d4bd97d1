"""The batch domain: jobs, their shards and the objects they read and write, as typed values.

The core and the store speak these; `converters` is the one place they meet protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    """Where a job is in its life; the values are what PostgreSQL stores."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    PARTIALLY_FAILED = "PARTIALLY_FAILED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class InputFormat(StrEnum):
    """The layout of a job's input."""

    JSONL = "JSONL"
    NPY = "NPY"
    PARQUET = "PARQUET"

    @classmethod
    def from_key(cls, key: str) -> InputFormat | None:
        """The format an object key's extension names, if any; a prefix (a key ending in '/')
        is a folder of Parquet files, the one layout that spans many objects."""
        lowered = key.lower()
        if lowered.endswith((".jsonl", ".ndjson", ".json")):
            return cls.JSONL
        if lowered.endswith(".npy"):
            return cls.NPY
        if lowered.endswith((".parquet", ".parq", "/")):
            return cls.PARQUET
        return None


class OutputFormat(StrEnum):
    """The layout of a job's result parts."""

    JSONL = "JSONL"
    PARQUET = "PARQUET"

    @property
    def extension(self) -> str:
        return ".parquet" if self is OutputFormat.PARQUET else ".jsonl"


@dataclass(frozen=True)
class ObjectRef:
    """One object in S3."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, uri: str) -> ObjectRef:
        """`s3://bucket/key` → ObjectRef; the key may be empty (a bucket root prefix)."""
        scheme, _, rest = uri.partition("://")
        bucket, _, key = rest.partition("/")
        if scheme != "s3" or not bucket:
            raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
        return cls(bucket, key)

    def child(self, name: str) -> ObjectRef:
        """The object `name` under this prefix."""
        prefix = self.key if not self.key or self.key.endswith("/") else f"{self.key}/"
        return ObjectRef(self.bucket, prefix + name)


@dataclass(frozen=True)
class StoredObject:
    """An object a job wrote: where, how many rows, and the SHA-256 of its bytes."""

    uri: str
    rows: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "rows": self.rows, "sha256": self.sha256}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> StoredObject:
        return cls(value["uri"], int(value["rows"]), value["sha256"])


@dataclass(frozen=True)
class JobSpec:
    """What the caller asked for."""

    model: str
    model_version: str
    input_uri: str
    input_format: InputFormat
    output_prefix: str
    shard_size: int
    priority: int = 0
    output_format: OutputFormat = OutputFormat.JSONL
    # Parquet inputs: model input name -> the column it is read from, where they differ.
    input_columns: tuple[tuple[str, str], ...] = ()
    # Parquet inputs: the column of row ids; "" is "id" when there is one, else positions.
    id_column: str = ""

    def column_of(self, input_name: str) -> str:
        """The Parquet column a model input is read from."""
        return dict(self.input_columns).get(input_name, input_name)


@dataclass(frozen=True)
class JobDraft:
    """A job as the caller describes it, before the server fills in defaults and checks it."""

    model: str
    model_version: str
    input_uri: str
    input_format: InputFormat | None
    output_prefix: str
    shard_size: int
    priority: int
    output_format: OutputFormat | None = None
    input_columns: tuple[tuple[str, str], ...] = ()
    id_column: str = ""


@dataclass(frozen=True)
class Progress:
    """Counters that only ever grow while a job runs."""

    rows_total: int = 0
    rows_done: int = 0
    rows_failed: int = 0
    shards_total: int = 0
    shards_done: int = 0

    @property
    def rows_finished(self) -> int:
        return self.rows_done + self.rows_failed


JOBS = "jobs"
"""The collection of jobs: a job's resource name is jobs/{id}."""


def job_name(job_id: str) -> str:
    """The resource name of the job `job_id`."""
    return f"{JOBS}/{job_id}"


def job_id_of(name: str) -> str | None:
    """The id in a job's resource name; None when `name` is not jobs/{id} with an id of one
    segment that PostgreSQL text can hold."""
    collection, _, job_id = name.partition("/")
    if collection != JOBS or not job_id or "/" in job_id or "\0" in job_id:
        return None
    return job_id


def shard_request_id(job_id: str, shard: int) -> str:
    """The request id a shard's calls carry, so the router's logs name the job and shard."""
    return f"{job_name(job_id)}/shards/{shard}"


@dataclass(frozen=True)
class Job:
    """A batch inference job as the store holds it."""

    id: str
    tenant: str
    spec: JobSpec
    state: JobState
    progress: Progress
    create_time: datetime
    failure_reason: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    manifest: StoredObject | None = None
    results: tuple[StoredObject, ...] = ()
    errors: StoredObject | None = None
    # W3C trace context of the create call, so the shards' work joins the caller's trace.
    trace_context: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return job_name(self.id)


@dataclass(frozen=True)
class ShardPlan:
    """One shard of a job: rows [row_start, row_start + row_count) at bytes [byte_start, byte_end).

    A Parquet shard is a row range of one file instead: `source` is that file's key ("" for the
    job's input itself) and its rows begin at row `source_row` of the file; its bytes are the
    file's footer's to find.
    """

    index: int
    row_start: int
    row_count: int
    byte_start: int
    byte_end: int
    source: str = ""
    source_row: int = 0


@dataclass(frozen=True)
class NpyLayout:
    """What one row of a .npy input is: its NumPy dtype (e.g. `<f4`) and shape."""

    dtype: str
    row_shape: tuple[int, ...]


@dataclass(frozen=True)
class InputPlan:
    """How a job's input divides into shards."""

    shards: tuple[ShardPlan, ...]
    rows_total: int
    npy: NpyLayout | None = None


@dataclass(frozen=True)
class ShardLease:
    """A worker's claim on one shard, valid until the store says otherwise."""

    job: Job
    shard: ShardPlan
    owner: str
    attempt: int
    npy: NpyLayout | None


@dataclass(frozen=True)
class RowError:
    """One input row that got no answer, and why."""

    row: int
    id: Any
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "row": self.row, "reason": self.reason}


@dataclass(frozen=True)
class ShardOutcome:
    """What a worker wrote for a shard."""

    result: StoredObject
    errors: StoredObject | None
    rows_done: int
    rows_failed: int


@dataclass(frozen=True)
class Page:
    """A page of jobs and the token of the next one ("" on the last)."""

    jobs: tuple[Job, ...]
    next_page_token: str
