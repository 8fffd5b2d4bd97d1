"""The reaper, on a database of its own (`own_store`) so no running relay or worker sees its
shards: shards whose message the broker lost (a broker restarted without its data) are published
again, and shards given back by stopping workers run again."""

from __future__ import annotations

from datetime import timedelta

from tensorway.batch.domain import InputFormat, InputPlan, JobSpec, ShardPlan
from tensorway.batch.job_store import JobStore

SPEC = JobSpec(
    model="digits",
    model_version="",
    input_uri="s3://inputs/rows.jsonl",
    input_format=InputFormat.JSONL,
    output_prefix="s3://results/job/",
    shard_size=10,
)
PLAN = InputPlan(shards=(ShardPlan(0, 0, 10, 0, 100), ShardPlan(1, 10, 10, 100, 200)), rows_total=20)


async def _publish_all(store: JobStore) -> list[bytes]:
    async with store.outbox_batch(100) as batch:
        return sorted(message.key for message in batch.messages)


async def test_shards_offered_and_never_taken_are_published_again_once(own_store: JobStore) -> None:
    await own_store.create_job("job1", "acme", "", SPEC, {})
    async with own_store.job_to_plan() as claimed:
        assert claimed is not None
        connection, job = claimed
        await own_store.record_plan(connection, job, PLAN)
    assert await _publish_all(own_store) == [b"job1/0", b"job1/1"]
    assert await own_store.republish_unclaimed(timedelta(minutes=1)) == 0

    # Offered in an earlier transaction, so older than no time at all.
    assert await own_store.republish_unclaimed(timedelta(0)) == 2
    # Their new messages wait in the outbox: nothing is published twice over.
    assert await own_store.republish_unclaimed(timedelta(0)) == 0

    assert await own_store.lease_shard("job1", 0, "worker", timedelta(seconds=30)) is not None
    assert await _publish_all(own_store) == [b"job1/0", b"job1/1"]
    # Only the shard nobody took; the leased one is the lease reaper's.
    assert await own_store.republish_unclaimed(timedelta(0)) == 1
    assert await _publish_all(own_store) == [b"job1/1"]


async def test_a_shard_given_back_runs_again_whatever_its_attempts(own_store: JobStore) -> None:
    """A stopping worker may take a shard and give it back more than once; that uses up none of
    the shard's attempts, while a failed attempt past the last fails it."""
    await own_store.create_job("job2", "acme", "", SPEC, {})
    async with own_store.job_to_plan() as claimed:
        assert claimed is not None
        connection, job = claimed
        await own_store.record_plan(connection, job, PLAN)
    await _publish_all(own_store)
    max_attempts = 2
    for _ in range(max_attempts + 1):
        lease = await own_store.lease_shard("job2", 0, "stopping-worker", timedelta(seconds=30))
        assert lease is not None
        await own_store.give_back(lease)
        assert await own_store.requeue_expired(max_attempts) == (1, 0)
    assert await own_store.shard_state("job2", 0) == "PENDING"
    assert await _publish_all(own_store) == [b"job2/0"] * (max_attempts + 1)

    lease = await own_store.lease_shard("job2", 0, "worker", timedelta(seconds=30))
    assert lease is not None
    await own_store.release_shard(lease, "UNAVAILABLE: the model is not loaded")
    assert await own_store.requeue_expired(max_attempts) == (0, 1)
    assert await own_store.shard_state("job2", 0) == "FAILED"
