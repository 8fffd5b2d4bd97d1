"""Settings the batch API and the batch workers share: where PostgreSQL, Kafka and S3 are."""

from __future__ import annotations

from datetime import timedelta

from tensorway.batch.object_store import ObjectStore
from tensorway.runtime import ServiceSettings


class BatchSettings(ServiceSettings):
    """The batch pipeline's backends; `service.Settings` and `worker.Settings` add their own."""

    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/tensorway"
    """PostgreSQL, the truth of jobs and shards."""
    postgres_pool_size: int = 10
    """Most connections to PostgreSQL at once."""
    postgres_timeout: timedelta = timedelta(seconds=5)
    """How long a call waits for a PostgreSQL connection before it fails UNAVAILABLE."""
    retry_after: timedelta = timedelta(seconds=1)
    """The RetryInfo delay sent with UNAVAILABLE when PostgreSQL is down."""
    kafka_bootstrap: str = "127.0.0.1:9092"
    """Kafka bootstrap servers, host:port[,host:port...]."""
    shards_topic: str = "tensorway.batch.shards"
    """The topic shard messages go through."""
    shards_topic_partitions: int = 8
    """Partitions of the shards topic when it is created: the most workers that share the work."""
    s3_endpoint: str = "http://127.0.0.1:9000"
    """S3 endpoint URL (MinIO in production)."""
    s3_access_key: str = ""
    """S3 access key."""
    s3_secret_key: str = ""
    """S3 secret key."""
    s3_region: str = "us-east-1"
    """S3 region; fixed so that presigning needs no round trip."""
    url_expiry: timedelta = timedelta(hours=1)
    """How long presigned result URLs work (the manifest's and each job's as the API shows it)."""

    def object_store(self) -> ObjectStore:
        return ObjectStore.connect(self.s3_endpoint, self.s3_access_key, self.s3_secret_key, self.s3_region)
