"""Shards whose message the broker lost (a broker restarted without its data) are published again
by the reaper, on a database of their own so no running relay or worker sees them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql

from tensorway.batch.domain import InputFormat, InputPlan, JobSpec, ShardPlan
from tensorway.batch.store import JobStore

SPEC = JobSpec(
    model="digits",
    model_version="",
    input_uri="s3://inputs/rows.jsonl",
    input_format=InputFormat.JSONL,
    output_prefix="s3://results/job/",
    shard_size=10,
)
PLAN = InputPlan(shards=(ShardPlan(0, 0, 10, 0, 100), ShardPlan(1, 10, 10, 100, 200)), rows_total=20)


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[JobStore]:
    name = f"unclaimed_{uuid.uuid4().hex[:8]}"
    admin_url = postgres_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    opened = await JobStore.open(
        postgres_url.rsplit("/", 1)[0] + f"/{name}",
        max_size=2,
        wait=timedelta(seconds=5),
        retry_after=timedelta(seconds=1),
    )
    yield opened
    await opened.close()
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


async def _publish_all(store: JobStore) -> list[bytes]:
    async with store.outbox_batch(100) as batch:
        return sorted(message.key for message in batch.messages)


async def test_shards_offered_and_never_taken_are_published_again_once(store: JobStore) -> None:
    await store.create_job("job1", "acme", "", SPEC, {})
    async with store.job_to_plan() as claimed:
        assert claimed is not None
        connection, job = claimed
        await store.record_plan(connection, job, PLAN)
    assert await _publish_all(store) == [b"job1/0", b"job1/1"]
    assert await store.republish_unclaimed(timedelta(minutes=1)) == 0

    await asyncio.sleep(0.3)
    assert await store.republish_unclaimed(timedelta(seconds=0.2)) == 2
    # Their new messages wait in the outbox: nothing is published twice over.
    assert await store.republish_unclaimed(timedelta(0)) == 0

    assert await store.lease_shard("job1", 0, "worker", timedelta(seconds=30)) is not None
    assert await _publish_all(store) == [b"job1/0", b"job1/1"]
    await asyncio.sleep(0.3)
    # Only the shard nobody took; the leased one is the lease reaper's.
    assert await store.republish_unclaimed(timedelta(seconds=0.2)) == 1
    assert await _publish_all(store) == [b"job1/1"]
