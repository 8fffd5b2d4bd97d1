"""The shard messages of the shards topic: what the outbox holds and the relay publishes (a
ShardTask naming the job and shard, keyed by both, with the job's tenant and trace in its
headers), and how a worker reads one back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, LiteralString

from google.protobuf.message import DecodeError
from psycopg.types.json import Jsonb

from tensorway.batch.domain import job_id_of, job_name
from tensorway.batch.v1 import shard_task_pb2
from tensorway.runtime.context import TENANT_HEADER


def shard_message(
    job_id: str, shard: int, tenant: str, trace_context: Mapping[str, str], priority: int
) -> dict[str, Any]:
    """The outbox row that hands one shard to the workers; its headers carry the job's trace."""
    task = shard_task_pb2.ShardTask(job=job_name(job_id), shard=shard)
    return {
        "job_id": job_id,
        "tenant": tenant,
        "priority": priority,
        # Keyed by job and shard, so a job's shards spread over the partitions and its workers.
        "key": f"{job_id}/{shard}".encode(),
        "value": task.SerializeToString(),
        "headers": Jsonb({**trace_context, TENANT_HEADER: tenant}),
    }


INSERT_OUTBOX: LiteralString = """INSERT INTO batch_outbox (job_id, tenant, priority, key, value, headers)
    VALUES (%(job_id)s, %(tenant)s, %(priority)s, %(key)s, %(value)s, %(headers)s)"""


@dataclass(frozen=True)
class OutboxBatch:
    """Messages to publish now, and how many more wait in the outbox for their turn or for room."""

    messages: list[OutboxMessage]
    left: int


@dataclass(frozen=True)
class OutboxMessage:
    """A record waiting to be published to the shards topic."""

    id: int
    key: bytes
    value: bytes
    headers: dict[str, str]


def parse_task(value: bytes) -> tuple[str, int]:
    """A shard message → (job id, shard index); ValueError when it is not one."""
    try:
        task = shard_task_pb2.ShardTask.FromString(value)
    except DecodeError as exc:
        raise ValueError(f"not a ShardTask: {exc}") from exc
    job_id = job_id_of(task.job)
    if job_id is None or task.shard < 0:
        raise ValueError(f"not a shard of a job: job={task.job!r} shard={task.shard}")
    return job_id, task.shard


def text_headers(headers: Mapping[str, bytes] | Iterable[tuple[str, bytes]] | None) -> dict[str, str]:
    """Kafka record headers (pairs, or a mapping) as text."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    return {
        str(key): value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        for key, value in pairs
    }
