"""The steady load the chaos suite keeps on the mesh while it breaks parts of it.

`RealtimeLoad` sends `simple` Infer calls through Envoy at a fixed rate (open loop: a slow
answer does not slow the sending), each with its own deadline, and records when each one
started, how long it took and how it ended. `BatchJobs` submits batch jobs to the batch API,
samples their progress and reads their results back to count lost and duplicated rows.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from minio import Minio

from tensorway.batch.v1 import batch_service_pb2 as batch_pb
from tensorway.batch.v1 import batch_service_pb2_grpc as batch_grpc
from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.runtime.context import TENANT_SCOPES, identity_metadata


@dataclass(frozen=True)
class Sample:
    """One real-time request: when it started (monotonic seconds), how long it took, its status."""

    started: float
    seconds: float
    code: grpc.StatusCode
    details: str = ""

    @property
    def ended(self) -> float:
        return self.started + self.seconds

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK


def _simple_request() -> inference_pb.InferRequest:
    first = np.arange(16, dtype=np.int32).reshape(1, 16)
    second = np.ones((1, 16), dtype=np.int32)
    return inference_pb.InferRequest(
        model_name="simple",
        inputs=[
            tensor_pb2.Tensor(name="INPUT0", datatype="INT32", shape=[1, 16], raw_contents=first.tobytes()),
            tensor_pb2.Tensor(name="INPUT1", datatype="INT32", shape=[1, 16], raw_contents=second.tobytes()),
        ],
    )


class RealtimeLoad:
    """`rate` requests a second through Envoy from a thread of its own, until `stop()`."""

    def __init__(self, envoy_address: str, ca: bytes, token: str, rate: float, deadline: float) -> None:
        self._address = envoy_address
        self._credentials = grpc.ssl_channel_credentials(ca)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._interval = 1.0 / rate
        self._deadline = deadline
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="realtime-load")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=self._deadline + 10)

    def samples(self, since: float, until: float) -> list[Sample]:
        """The requests that started in [since, until)."""
        with self._lock:
            return [sample for sample in self._samples if since <= sample.started < until]

    async def _run(self) -> None:
        request = _simple_request().SerializeToString()
        async with grpc.aio.secure_channel(self._address, self._credentials) as channel:
            infer = channel.unary_unary("/tensorway.inference.v1.InferenceService/Infer")
            running: set[asyncio.Task[None]] = set()
            next_send = time.monotonic()
            while not self._stopping.is_set():
                task = asyncio.create_task(self._one(infer, request))
                running.add(task)
                task.add_done_callback(running.discard)
                next_send += self._interval
                await asyncio.sleep(max(0.0, next_send - time.monotonic()))
            await asyncio.gather(*running)

    async def _one(self, infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], request: bytes) -> None:
        started = time.monotonic()
        code, details = grpc.StatusCode.OK, ""
        try:
            await infer(request, timeout=self._deadline, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details() or ""
        sample = Sample(started, time.monotonic() - started, code, details)
        with self._lock:
            self._samples.append(sample)


@dataclass(frozen=True)
class JobOutcome:
    """A finished batch job and what its results hold."""

    name: str
    state: int
    rows: int
    rows_lost: int
    rows_duplicated: int
    failure_reason: str


CHAOS_TENANT = "chaos"


class BatchJobs:
    """Jobs of `digits` rows against the batch API, their progress, and their results checked."""

    def __init__(self, batch_address: str, s3: Minio, rows: int, shard_size: int) -> None:
        self._channel = grpc.insecure_channel(batch_address)
        self._stub = batch_grpc.BatchServiceStub(self._channel)
        self._rows = rows
        self._shard_size = shard_size
        # As Envoy would send it for a tenant token; the input lies under that tenant's prefix.
        self._metadata = tuple(identity_metadata(CHAOS_TENANT, TENANT_SCOPES))
        bucket = "tensorway-batch"
        if not s3.bucket_exists(bucket):
            s3.make_bucket(bucket)
        rows_text = (
            json.dumps({"id": i, "inputs": {"input": [float((i + j) % 17) for j in range(64)]}})
            for i in range(rows)
        )
        lines = "".join(f"{row}\n" for row in rows_text).encode()
        key = f"uploads/{CHAOS_TENANT}/digits-{uuid.uuid4().hex}.jsonl"
        s3.put_object(bucket, key, io.BytesIO(lines), len(lines))
        self._input_uri = f"s3://{bucket}/{key}"

    def close(self) -> None:
        self._channel.close()

    def submit(self) -> str:
        request = batch_pb.CreateJobRequest(
            job=batch_pb.Job(model="digits", input_uri=self._input_uri, shard_size=self._shard_size),
            request_id=uuid.uuid4().hex,
        )
        return str(self._stub.CreateJob(request, timeout=10, metadata=self._metadata).job.name)

    def rows_finished(self, name: str) -> int | None:
        """Rows done or failed so far; None while the batch API cannot say."""
        try:
            job = self._stub.GetJob(batch_pb.GetJobRequest(name=name), timeout=1, metadata=self._metadata).job
        except grpc.RpcError:
            return None
        return int(job.progress.rows_done + job.progress.rows_failed)

    def wait(self, name: str, timeout: float) -> JobOutcome:
        """Wait for the job to end, then count its result rows against its input rows."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                request = batch_pb.GetJobRequest(name=name)
                job = self._stub.GetJob(request, timeout=2, metadata=self._metadata).job
                if job.state in _FINAL_STATES:
                    break
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not end within {timeout:g}s")
            time.sleep(0.2)
        ids = [line["id"] for part in job.results for line in _lines(part.presigned_url)]
        expected = set(range(self._rows))
        return JobOutcome(
            name=name,
            state=job.state,
            rows=len(ids),
            rows_lost=len(expected - set(ids)),
            rows_duplicated=len(ids) - len(set(ids)),
            failure_reason=job.failure_reason,
        )


_FINAL_STATES = frozenset(
    {
        batch_pb.JOB_STATE_SUCCEEDED,
        batch_pb.JOB_STATE_PARTIALLY_FAILED,
        batch_pb.JOB_STATE_FAILED,
        batch_pb.JOB_STATE_CANCELLED,
    }
)


def _lines(url: str) -> list[dict[str, object]]:
    # A presigned URL of the local S3 on loopback, made by the batch API.
    with urllib.request.urlopen(url, timeout=10) as response:
        return [json.loads(line) for line in response.read().splitlines() if line]


class ProgressSampler:
    """Samples a job's finished rows every `interval` from a thread, to see when it stalls."""

    def __init__(self, jobs: BatchJobs, name: str, interval: float = 0.1) -> None:
        self._jobs = jobs
        self._name = name
        self._interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-progress")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            rows = self._jobs.rows_finished(self._name)
            if rows is not None:
                self.samples.append((time.monotonic(), rows))


def percentile(values: Sequence[float], share: float) -> float | None:
    """The nearest-rank percentile of `values` (None for none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(share * len(ordered))) - 1))]
