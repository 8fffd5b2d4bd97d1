"""Batch workers: a faust-streaming app in a consumer group on the shards topic.

For each shard message a worker leases the shard in PostgreSQL, reads its rows from S3,
coalesces them into batched tensors, infers through the mesh with bounded concurrency, writes
the shard's result under its fixed key and marks the shard done: counted once, however often the
message arrives. While it works it renews the lease; if it dies, the lease runs out and the API's
reaper hands the shard out again. `tensorway serve batch-worker` runs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import faust
import grpc
import pyarrow.parquet as pq
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP, EventT, StreamT, TransportT
from opentelemetry import trace
from pydantic_settings import SettingsConfigDict

from tensorway.batch import metrics
from tensorway.batch.domain import (
    InputFormat,
    ObjectRef,
    OutputFormat,
    RowError,
    ShardLease,
    shard_request_id,
)
from tensorway.batch.inference import GrpcInferenceClient, InferenceClient, infer_with_retries
from tensorway.batch.inputs import Batch, InputError, jsonl_batches, npy_batches
from tensorway.batch.job_store import JobStore
from tensorway.batch.object_store import ObjectStore, StorageError
from tensorway.batch.outbox import ensure_topic
from tensorway.batch.parquet import DEFAULT_ID_COLUMN, ERROR_COLUMN, AnsweredRows, read_shard
from tensorway.batch.results import ResultWriter, ShardAnswers
from tensorway.batch.settings import BatchSettings
from tensorway.batch.shard_messages import parse_task, text_headers
from tensorway.batch.tensors import from_tensor, to_tensor
from tensorway.inference.v1 import inference_service_pb2 as infer_pb
from tensorway.runtime import ServiceServer, TensorwayError, create_server, tracing
from tensorway.runtime.context import DEFAULT_TENANT, TENANT_HEADER, RequestContext, Scope, current
from tensorway.tensors.signatures import ModelSignature, TensorSpec

logger = logging.getLogger(__name__)
# What a worker may do for a job's tenant: infer, with the tenant's own limits.
WORKER_SCOPES = frozenset({Scope.INFER.value})
# Parquet footers a worker keeps, the most recently read: a few jobs' files.
FOOTERS_KEPT = 64


class Settings(BatchSettings):
    """A batch worker's settings, from TENSORWAY_BATCH_WORKER_* variables."""

    model_config = SettingsConfigDict(env_prefix="TENSORWAY_BATCH_WORKER_", extra="ignore")

    inference_target: str = "127.0.0.1:50051"
    """host:port of the router (anything serving tensorway.inference.v1)."""
    inference_timeout: timedelta = timedelta(seconds=30)
    """Deadline of one batched inference request."""
    inference_attempts: int = 4
    """Tries of a batch that failed with UNAVAILABLE, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED."""
    inference_backoff: timedelta = timedelta(milliseconds=200)
    """Pause before the second try; it doubles for each further one."""
    max_batch_size: int = 0
    """Most rows per inference request; 0 takes the model's max_batch_size."""
    infer_concurrency: int = 8
    """Inference requests in flight at once, across all the worker's shards."""
    shard_concurrency: int = 4
    """Shards one worker processes at once; more than two keep inference busy while other
    shards' objects are read and written."""
    consumer_group: str = "tensorway-batch-workers"
    """The Kafka consumer group all workers join."""
    kafka_session_timeout: timedelta = timedelta(seconds=6)
    """How long the group waits for a silent worker before giving its partitions to others;
    6 s is the least Apache Kafka's brokers accept by default (group.min.session.timeout.ms)."""
    kafka_heartbeat_interval: timedelta = timedelta(seconds=1)
    """How often a worker tells the group it is alive."""
    kafka_commit_interval: timedelta = timedelta(seconds=1)
    """How often processed offsets are committed; what is not yet committed is delivered again."""
    kafka_fetch_max_wait: timedelta = timedelta(milliseconds=100)
    """How long the broker may hold a fetch that finds nothing new. Tansu hands over a message
    that arrives meanwhile late: 0.15-0.9 s with faust's own 1.5 s, under 10 ms with 100 ms."""
    lease_timeout: timedelta = timedelta(seconds=6)
    """How long a shard stays a silent worker's; the worker renews it every third of this (a
    PostgreSQL write per shard in progress every 2 s by default)."""
    worker_id: str = ""
    """This worker's name in shard leases; empty makes one from the host and process id."""
    lag_report_interval: timedelta = timedelta(seconds=1)
    """How often the consumer lag gauge is updated from the worker's partitions, and a partition
    read past its end (a broker that lost its log) is read again from its start."""
    signature_ttl: timedelta = timedelta(minutes=1)
    """How long a model's signature is kept before it is asked for again, so a model whose
    inputs changed under the same name and version (re-registered, or a version left to the
    router's choice) is read anew."""


class JobCannotRun(Exception):
    """A problem no retry can fix (unknown model, input that does not fit it): the job fails."""


class LeaseLost(Exception):
    """The shard's lease ran out and could not be renewed: another worker may have it now."""


@dataclass(frozen=True)
class Answers:
    """A shard's outcome before it is written, and the model outputs the part has columns for."""

    shard: ShardAnswers
    outputs: tuple[TensorSpec, ...]


def _json_id(value: Any) -> Any:
    if hasattr(value, "as_py"):  # a pyarrow scalar: a Parquet input's id
        return value.as_py()
    return value.item() if hasattr(value, "item") else value


class ShardRunner:
    """Runs one shard from lease to done. Independent of Kafka, so tests can drive it directly."""

    def __init__(
        self,
        *,
        store: JobStore,
        objects: ObjectStore,
        results: ResultWriter,
        inference: InferenceClient,
        settings: Settings,
        owner: str,
    ) -> None:
        self._store = store
        self._objects = objects
        self._results = results
        self._inference = inference
        self._settings = settings
        self._owner = owner
        self._infer_slots = asyncio.Semaphore(settings.infer_concurrency)
        # (model, version) → the signature and when it was fetched (time.monotonic()).
        self._signatures: dict[tuple[str, str], tuple[ModelSignature, float]] = {}
        # (job, Parquet file) → its footer, so a file's later shards cost one GET each, not three.
        self._footers: OrderedDict[tuple[str, str], pq.FileMetaData] = OrderedDict()

    async def run(self, job_id: str, shard: int) -> None:
        """Process the shard unless it is finished, cancelled or another live worker's."""
        leasing = asyncio.ensure_future(
            self._store.lease_shard(job_id, shard, self._owner, self._settings.lease_timeout)
        )
        try:
            lease = await asyncio.shield(leasing)
        except asyncio.CancelledError:
            # Stopped while PostgreSQL was leasing it: a lease it recorded is given back too, not
            # left to run out.
            taken = None
            with contextlib.suppress(Exception):
                taken = await leasing
            if taken is not None:
                await self._give_back(taken)
            raise
        if lease is None:
            logger.info("shard skipped: finished, cancelled or leased", extra={"job": job_id, "shard": shard})
            metrics.SHARDS.labels("duplicate").inc()
            return
        leased_at = time.perf_counter()
        # The router sees whose rows these are, from the job the database holds, never from the
        # message's headers: its limits and routing count them against the job's tenant, and
        # the call may infer and nothing else.
        acting = RequestContext(
            request_id=shard_request_id(job_id, shard),
            tenant=lease.job.tenant,
            scopes=WORKER_SCOPES,
        )
        token = current.set(acting)
        try:
            answers = await self._answer_while_leased(lease)
        except JobCannotRun as exc:
            logger.info("job cannot run", extra={"job": job_id, "reason": str(exc)})
            await self._store.fail_job(job_id, str(exc))
            metrics.SHARDS.labels("failed").inc()
            return
        except Exception as exc:
            logger.exception("shard attempt failed", extra={"job": job_id, "shard": shard})
            await self._store.release_shard(lease, f"{type(exc).__name__}: {exc}")
            metrics.SHARDS.labels("failed").inc()
            return
        except asyncio.CancelledError:
            await self._give_back(lease)
            raise
        finally:
            current.reset(token)
        if answers is None:
            logger.info("shard lease lost; dropping the attempt", extra={"job": job_id, "shard": shard})
            metrics.SHARDS.labels("failed").inc()
            return
        await self._finish(lease, answers, leased_at)

    async def _give_back(self, lease: ShardLease) -> None:
        """The worker is stopping (a rollout, a scale-down) with the shard unfinished: it is handed
        out again at the reaper's next sweep rather than once its lease runs out. A shard already
        recorded as done stays done; a part already written is written again, to the same key, by
        the next attempt."""
        logger.info(
            "worker stopping; giving the shard back",
            extra={"job": lease.job.name, "shard": lease.shard.index},
        )
        metrics.SHARDS.labels("stopped").inc()
        try:
            await asyncio.shield(self._store.give_back(lease))
        except Exception:
            logger.warning("cannot give the shard back; its lease will run out", exc_info=True)

    async def _answer_while_leased(self, lease: ShardLease) -> Answers | None:
        """The shard's answers, its lease renewed meanwhile; None when the lease was lost, which
        stops the work at once."""
        answers: Answers | None = None
        failure: Exception | None = None
        lost = False
        try:
            async with asyncio.TaskGroup() as group:
                keeper = group.create_task(self._keep_lease(lease))
                try:
                    answers = await self._answer(lease)
                except Exception as exc:
                    # Raised as it is once the keeper has stopped, not inside the group's
                    # ExceptionGroup: the caller tells a job that cannot run from a failed try.
                    failure = exc
                keeper.cancel()
        except* LeaseLost:
            lost = True
        if failure is not None:
            raise failure
        return None if lost else answers

    async def _keep_lease(self, lease: ShardLease) -> None:
        """Renews the lease until cancelled; LeaseLost when it is no longer this worker's."""
        interval = self._settings.lease_timeout.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                still_ours = await self._store.renew_lease(lease, self._settings.lease_timeout)
            except Exception:
                logger.warning("lease renewal failed; trying again", exc_info=True)
                continue
            if not still_ours:
                raise LeaseLost(f"shard {lease.shard.index} of {lease.job.name}")

    async def _finish(self, lease: ShardLease, answers: Answers, leased_at: float) -> None:
        job, index = lease.job, lease.shard.index
        try:
            outcome = await self._results.write_shard(job, lease.shard, answers.shard, answers.outputs)
            completion = await self._store.complete_shard(lease, outcome)
        except StorageError as exc:
            logger.warning(
                "cannot write shard result", extra={"job": job.name, "shard": index, "error": str(exc)}
            )
            await self._store.release_shard(lease, str(exc))
            metrics.SHARDS.labels("failed").inc()
            return
        except asyncio.CancelledError:
            # Past this point the shard is recorded as done: nothing to give back.
            await self._give_back(lease)
            raise
        if not completion.recorded:
            metrics.SHARDS.labels("duplicate").inc()
            # Either another worker finished it (same bytes, same key: keep them) or the job
            # ended meanwhile: then nothing of this shard may stay behind.
            if await self._store.shard_state(job.id, index) == "CANCELLED":
                await self._results.discard_shard(job, index)
            return
        model = job.spec.model
        metrics.SHARDS.labels("done").inc()
        metrics.ROWS.labels(model, "ok").inc(outcome.rows_done)
        metrics.ROWS.labels(model, "failed").inc(outcome.rows_failed)
        metrics.SHARD_SECONDS.labels(model).observe(time.perf_counter() - leased_at)
        logger.info(
            "shard done",
            extra={
                "job": job.name,
                "shard": index,
                "rows_done": outcome.rows_done,
                "rows_failed": outcome.rows_failed,
            },
        )
        if completion.job_finished:
            await self._results.finalize(self._store, job.id)

    async def _signature(self, lease: ShardLease) -> ModelSignature:
        key = (lease.job.spec.model, lease.job.spec.model_version)
        cached = self._signatures.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self._settings.signature_ttl.total_seconds():
            return cached[0]
        try:
            signature = await self._inference.signature(*key)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise JobCannotRun(f"model {key[0]!r}: {exc.details()}") from exc
            raise
        self._signatures[key] = (signature, now)
        return signature

    def _batch_size(self, signature: ModelSignature) -> int:
        if signature.max_batch_size <= 0:
            return 1
        cap = self._settings.max_batch_size
        return min(signature.max_batch_size, cap) if cap > 0 else signature.max_batch_size

    async def _answer(self, lease: ShardLease) -> Answers:
        signature = await self._signature(lease)
        spec, shard = lease.job.spec, lease.shard
        size = self._batch_size(signature)
        errors: list[RowError] = []
        ids = None
        input_ref = ObjectRef.parse(spec.input_uri)
        output_names = {o.name for o in signature.outputs}
        if spec.output_format is OutputFormat.PARQUET:
            taken = {spec.id_column or DEFAULT_ID_COLUMN, ERROR_COLUMN} & output_names
            if taken:
                raise JobCannotRun(
                    f"model {spec.model!r} has an output named {sorted(taken)[0]!r}, the name of the "
                    "id or error column of Parquet results: name another id column, or ask for JSONL"
                )
        try:
            if spec.input_format is InputFormat.PARQUET:
                source = ObjectRef(input_ref.bucket, shard.source or input_ref.key)
                columns = dict(spec.input_columns)
                footer = (lease.job.id, source.uri)
                read = await self._objects.with_file(
                    source,
                    shard.byte_end,
                    lambda file: read_shard(
                        file,
                        source.uri,
                        shard,
                        signature=signature,
                        columns=columns,
                        id_column=spec.id_column,
                        batch_rows=size,
                        metadata=self._footers.get(footer),
                    ),
                )
                self._footers[footer] = read.metadata
                self._footers.move_to_end(footer)
                if len(self._footers) > FOOTERS_KEPT:
                    self._footers.popitem(last=False)
                batches, errors, ids = read.batches, read.errors, read.ids
            else:
                data = await self._objects.read(
                    input_ref, shard.byte_start, shard.byte_end - shard.byte_start
                )
                if lease.npy is not None:
                    batches = npy_batches(data, shard.row_start, lease.npy, signature, size)
                else:
                    # Parsing a shard's JSON is the worker's largest cost: in a thread, Arrow's
                    # parser leaves the event loop free to keep other shards' requests in flight.
                    batches, errors = await asyncio.to_thread(
                        jsonl_batches, data, shard.row_start, signature, size
                    )
        except InputError as exc:
            raise JobCannotRun(f"the input {spec.input_uri} {exc}") from exc
        answered = await asyncio.gather(*(self._infer(lease, signature, b, i) for i, b in enumerate(batches)))
        pieces: list[AnsweredRows] = []
        for batch_pieces, batch_errors in answered:
            pieces.extend(batch_pieces)
            errors.extend(batch_errors)
        errors.sort(key=lambda e: e.row)
        return Answers(ShardAnswers(pieces, errors, ids), signature.outputs)

    async def _infer(
        self, lease: ShardLease, signature: ModelSignature, batch: Batch, number: int
    ) -> tuple[list[AnsweredRows], list[RowError]]:
        """Answers for a batch's rows; a batch the model refuses is retried row by row, so only
        the rows at fault fail."""
        job = lease.job
        batched = signature.max_batch_size > 0
        request = infer_pb.InferRequest(
            model_name=job.spec.model,
            model_version=job.spec.model_version,
            id=f"{job.name}/shards/{lease.shard.index}/{number}",
            inputs=[
                to_tensor(
                    spec.name,
                    spec.datatype,
                    batch.inputs[spec.name] if batched else batch.inputs[spec.name][0],
                )
                for spec in signature.inputs
            ],
            outputs=[infer_pb.RequestedOutput(name=spec.name, binary=True) for spec in signature.outputs],
        )
        try:
            async with self._infer_slots:
                response = await infer_with_retries(
                    self._inference,
                    request,
                    self._settings.inference_attempts,
                    self._settings.inference_backoff,
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            if len(batch.rows) == 1:
                return [], [RowError(batch.rows[0], _json_id(batch.ids[0]), exc.details() or "invalid row")]
            singles = [
                self._infer(
                    lease,
                    signature,
                    Batch(
                        [row],
                        batch.ids[i : i + 1],
                        {name: array[i : i + 1] for name, array in batch.inputs.items()},
                    ),
                    number,
                )
                for i, row in enumerate(batch.rows)
            ]
            pieces: list[AnsweredRows] = []
            errors: list[RowError] = []
            for row_pieces, row_errors in await asyncio.gather(*singles):
                pieces.extend(row_pieces)
                errors.extend(row_errors)
            return pieces, errors
        outputs = {tensor.name: from_tensor(tensor) for tensor in response.outputs}
        return [
            AnsweredRows(
                batch.rows,
                batch.ids,
                {name: array if batched else array[None] for name, array in outputs.items()},
            )
        ], []


class _ConsumerThread(faust_kafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: faust_kafka.Transport) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # faust fixes the fetch wait at 1.5 s and offers no setting; aiokafka reads it at start.
        consumer._fetch_max_wait_ms = int(cast(_App, self.app).fetch_max_wait.total_seconds() * 1000)
        return consumer


class _Consumer(faust_kafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_kafka.Transport):
    Consumer = _Consumer


class _App(faust.App):
    """faust's app on its aiokafka transport, with the fetch wait the worker's settings give."""

    def __init__(self, *args: Any, fetch_max_wait: timedelta, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_max_wait = fetch_max_wait

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)


class BatchWorker:
    """The faust app: a consumer group on the shards topic, each message run by a ShardRunner."""

    def __init__(self, settings: Settings, runner: ShardRunner) -> None:
        self._runner = runner
        self._stopping: asyncio.Task[None] | None = None
        self._lag = metrics.ConsumerLag()
        self._lag_interval = settings.lag_report_interval.total_seconds()
        self._lag_reporting: asyncio.Task[None] | None = None
        # faust makes a data dir even with in-memory stores; by default it lands in the cwd.
        self._datadir = tempfile.mkdtemp(prefix="tensorway-batch-worker-")
        self.app = _App(
            settings.consumer_group,
            fetch_max_wait=settings.kafka_fetch_max_wait,
            broker=[f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")],
            web_enabled=False,
            autodiscover=False,
            datadir=self._datadir,
            store="memory://",
            # Only the shards topic: no tables, so no leader topic or changelogs.
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=settings.kafka_session_timeout.total_seconds(),
            broker_heartbeat_interval=settings.kafka_heartbeat_interval.total_seconds(),
            broker_commit_interval=settings.kafka_commit_interval.total_seconds(),
            stream_wait_empty=False,
        )
        topic = self.app.topic(
            settings.shards_topic, value_type=bytes, key_type=bytes, value_serializer="raw"
        )
        self.app.agent(topic, name="shards", concurrency=settings.shard_concurrency)(self._consume)

    async def _consume(self, stream: StreamT[bytes]) -> None:
        # An event is acknowledged (its offset may be committed) when the loop moves past it.
        async for event in stream.events():
            with metrics.SHARDS_RUNNING.track_inprogress():
                await self.handle(event)

    async def handle(self, event: EventT[bytes]) -> None:
        """One shard message. A malformed one is logged and skipped, and so is one whose shard a
        dependency (PostgreSQL, S3, the router) failed: its lease runs out or its message is
        published again. Anything else is a fault here, and crashes the agent, which faust
        restarts, where its traceback is seen."""
        message = event.message
        try:
            job_id, shard = parse_task(bytes(event.value))
            headers = text_headers(message.headers)
        except (ValueError, TypeError) as exc:
            logger.warning(
                "skipping a malformed shard message",
                extra={"partition": message.partition, "offset": message.offset, "error": str(exc)},
            )
            metrics.SHARDS.labels("malformed").inc()
            return
        # Until the shard is leased, the record's tenant header is only a label for the logs.
        request = RequestContext(
            request_id=shard_request_id(job_id, shard), tenant=headers.get(TENANT_HEADER) or DEFAULT_TENANT
        )
        token = current.set(request)
        try:
            with tracing.tracer.start_as_current_span(
                "batch shard",
                context=tracing.extract(headers.items()),
                kind=trace.SpanKind.CONSUMER,
                attributes={"tensorway.batch.job": job_id, "tensorway.batch.shard": shard},
            ):
                await self._runner.run(job_id, shard)
        except (TensorwayError, StorageError, grpc.RpcError):
            logger.exception("shard failed", extra={"job": job_id, "shard": shard})
        finally:
            current.reset(token)

    async def start(self) -> None:
        await self.app.start()
        # One task beside faust's own, stopped by `shutdown` before the app is.
        self._lag_reporting = asyncio.create_task(self._report_lag(), name="consumer lag")

    async def _report_lag(self) -> None:
        consumer = self.app.consumer
        while True:
            await asyncio.sleep(self._lag_interval)
            try:
                positions = [
                    metrics.PartitionPosition(
                        tp.topic, tp.partition, await consumer.position(tp), consumer.highwater(tp)
                    )
                    for tp in consumer.assignment()
                ]
                self._lag.report(positions)
                await self._reread_past_end(positions)
            # A rebalance or a broker outage leaves the gauge as it was until the next look.
            except Exception:
                logger.debug("consumer lag not read this time", exc_info=True)

    async def _reread_past_end(self, positions: list[metrics.PartitionPosition]) -> None:
        """Read a partition again from its start when the worker stands past the end its last
        fetch saw. Only a broker that lost its log leaves it there: a worker that finished old
        shards across the restart commits their offsets to the new group before it learns the
        group is gone, and the next assignment starts from them. Apache Kafka answers such a
        fetch with OFFSET_OUT_OF_RANGE and the consumer starts over; Tansu holds it until the
        log grows that long and skips every message before, so shards published anew would
        wait for minutes of republishing. The fetch's high watermark is the end to trust:
        Tansu's ListOffsets answers the last record batch's first offset + 1, below the end
        whenever that batch holds more than one message, so checking at assignment would read
        healthy partitions again at every rebalance. Shard messages are idempotent: reading
        again costs only skipped duplicates."""
        for at in positions:
            if at.position is None or at.end is None or at.position <= at.end:
                continue
            logger.warning(
                "position past the partition's end: reading it again from its start",
                extra={"partition": f"{at.topic}/{at.partition}", "position": at.position, "end": at.end},
            )
            # faust's seek also forgets the offset it read last, below which it drops messages.
            await self.app.consumer.seek(TP(at.topic, at.partition), 0)

    async def shutdown(self) -> None:
        """Leave the group and stop; safe to call twice."""
        if self._lag_reporting is not None:
            self._lag_reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_reporting
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.app.stop())
        await asyncio.shield(self._stopping)
        shutil.rmtree(self._datadir, ignore_errors=True)


def worker_name(settings: Settings) -> str:
    return settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def create(settings: Settings) -> tuple[ServiceServer, int]:
    """A worker: consuming from here on, with a server that reports its health and metrics."""
    async with contextlib.AsyncExitStack() as stack:
        store = await JobStore.for_service(settings)
        stack.push_async_callback(store.close)
        inference = GrpcInferenceClient.connect(settings.inference_target, settings.inference_timeout)
        stack.push_async_callback(inference.close)
        objects = settings.object_store()
        runner = ShardRunner(
            store=store,
            objects=objects,
            results=ResultWriter(objects, settings.url_expiry),
            inference=inference,
            settings=settings,
            owner=worker_name(settings),
        )
        worker = BatchWorker(settings, runner)
        stack.push_async_callback(worker.shutdown)
        await ensure_topic(settings.kafka_bootstrap, settings.shards_topic, settings.shards_topic_partitions)
        server, port = create_server("batch-worker", settings, [])
        await worker.start()
        # Cleanups run last added first: stop consuming, then close the channel and the pool.
        cleanups = stack.pop_all()
    server.on_stop(cleanups.aclose)
    return server, port
