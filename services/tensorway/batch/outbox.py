"""The outbox relay: publishes the shard messages that transactions left in `batch_outbox`.

A message leaves the table only after the broker acknowledged it, in the same transaction that
locked it; a crash in between publishes it again, which the workers' idempotent shard
completion absorbs. So every shard the database holds reaches the topic at least once, and the
topic never names a shard the database does not hold.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import KafkaError, TopicAlreadyExistsError  # type: ignore[import-untyped]

from tensorway.batch.job_store import JobStore

logger = logging.getLogger(__name__)


async def ensure_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create the shards topic unless it exists; its partitions bound how many workers share a job."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        logger.info("created topic", extra={"topic": topic, "partitions": partitions})
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


def kafka_headers(headers: dict[str, str]) -> Sequence[tuple[str, bytes]]:
    return [(key, value.encode()) for key, value in headers.items()]


class OutboxRelay:
    """Moves outbox rows to the shards topic, a batch at a time, each tenant's most urgent job
    first and the tenants in turn, weighted by their `shares` (tenant → share, 1 for any other);
    with `in_flight`, never more shards published and unfinished."""

    def __init__(
        self,
        store: JobStore,
        producer: AIOKafkaProducer,
        topic: str,
        batch_size: int,
        *,
        bootstrap: str,
        partitions: int,
        in_flight: int | None = None,
        shares: Mapping[str, int] | None = None,
    ) -> None:
        self._store = store
        self._in_flight = in_flight
        self._shares = dict(shares or {})
        self._left = 0
        self._producer = producer
        self._topic = topic
        self._batch_size = batch_size
        self._bootstrap = bootstrap
        self._partitions = partitions

    @classmethod
    async def connect(
        cls,
        store: JobStore,
        bootstrap: str,
        topic: str,
        batch_size: int,
        partitions: int,
        *,
        in_flight: int | None = None,
        shares: Mapping[str, int] | None = None,
    ) -> OutboxRelay:
        # acks="all" and no idempotence: Kafka-compatible brokers without idempotent producers
        # (Tansu) accept it, and duplicates are harmless here anyway.
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
        await producer.start()
        return cls(
            store,
            producer,
            topic,
            batch_size,
            bootstrap=bootstrap,
            partitions=partitions,
            in_flight=in_flight,
            shares=shares,
        )

    async def relay_batch(self) -> bool:
        """Publish one batch; True when there may be more waiting."""
        try:
            async with self._store.outbox_batch(self._batch_size, self._in_flight, self._shares) as batch:
                messages = batch.messages
                send = self._producer.send
                sent = [
                    await send(self._topic, m.value, key=m.key, headers=kafka_headers(m.headers))
                    for m in messages
                ]
                await asyncio.gather(*sent)
        except KafkaError:
            # A broker that came back without its data has no topic either, and a broker that
            # does not create topics on use would refuse every send until it is made again.
            await ensure_topic(self._bootstrap, self._topic, self._partitions)
            raise
        self._left = batch.left
        return len(messages) == self._batch_size

    @property
    def backlogged(self) -> bool:
        """Messages waited in the outbox at the last look: a finished shard may make room."""
        return self._left > 0

    async def close(self) -> None:
        await self._producer.stop()
