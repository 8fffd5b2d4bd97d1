"""Real servers around the batch pipeline: the batch API in-process, batch workers as
`tensorway serve batch-worker` processes (so a test can SIGKILL one), and an InferenceService
that forwards to the real Triton, standing in for the router."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psycopg
import pytest
import urllib3
from minio import Minio
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from tritonclient.grpc import aio as triton_aio

from tensorway.batch import service as batch_service
from tensorway.batch.job_store import JobStore
from tensorway.batch.tensors import from_tensor, to_tensor
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.common.v1 import tensor_pb2
from tensorway.devstack import S3Credentials
from tensorway.inference.v1 import inference_service_pb2 as infer_pb
from tensorway.inference.v1 import inference_service_pb2_grpc as infer_grpc
from tensorway.runtime import (
    InvalidArgument,
    NotFound,
    ServiceBinding,
    ServiceSettings,
    create_server,
)
from tensorway.runtime.context import TENANT_SCOPES, Scope, caller, identity_metadata
from tests.ports import free_port

BUCKET = "batch-tests"
# A bucket outside the service's, part of which settings let tenant acme read.
SHARED_BUCKET = "batch-tests-shared"
# Small, so that a backlog waits in the outbox where tenants take turns.
SHARDS_IN_FLIGHT = 16
LEASE_TIMEOUT = "PT3S"


class TritonForwarder(infer_grpc.InferenceServiceServicer):
    """The router's contract over the real Triton, through tritonclient's asyncio client."""

    def __init__(self, triton: triton_aio.InferenceServerClient) -> None:
        self.triton = triton
        self.infer_calls = 0
        # Job id → the identities (tenant, scopes) its shards' calls came with.
        self.callers: dict[str, set[tuple[str, frozenset[str]]]] = defaultdict(set)
        # Tenant → the event that lets its Infer calls through, and how many calls wait on it.
        self._gates: dict[str, asyncio.Event] = {}
        self.held: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def holding(self, tenant_name: str) -> Iterator[None]:
        """Infer calls of the tenant's shards wait until the block ends, as on a model that
        takes its time."""
        gate = self._gates[tenant_name] = asyncio.Event()
        try:
            yield
        finally:
            gate.set()
            del self._gates[tenant_name]

    def _record_caller(self) -> None:
        request = caller()
        job_id = request.request_id.removeprefix("jobs/").partition("/")[0]
        self.callers[job_id].add((request.tenant, request.scopes))

    async def GetModelMetadata(
        self, request: infer_pb.GetModelMetadataRequest, context: Any
    ) -> infer_pb.GetModelMetadataResponse:
        self._record_caller()
        try:
            metadata = await self.triton.get_model_metadata(request.model_name, as_json=True)
            config = (await self.triton.get_model_config(request.model_name, as_json=True))["config"]
        except Exception as exc:
            raise NotFound("model", request.model_name) from exc
        batched = int(config.get("max_batch_size", 0)) > 0

        def specs(items: list[dict[str, Any]]) -> list[tensor_pb2.TensorSpec]:
            return [
                tensor_pb2.TensorSpec(
                    name=i["name"],
                    datatype=i["datatype"],
                    shape=[int(d) for d in i["shape"]][1 if batched else 0 :],
                )
                for i in items
            ]

        return infer_pb.GetModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=specs(metadata["inputs"]),
            outputs=specs(metadata["outputs"]),
            max_batch_size=int(config.get("max_batch_size", 0)),
        )

    async def Infer(self, request: infer_pb.InferRequest, context: Any) -> infer_pb.InferResponse:
        self.infer_calls += 1
        self._record_caller()
        gate = self._gates.get(caller().tenant)
        if gate is not None:
            self.held[caller().tenant] += 1
            await gate.wait()
        inputs = []
        for tensor in request.inputs:
            array = from_tensor(tensor)
            item = triton_aio.InferInput(tensor.name, list(array.shape), tensor.datatype)
            item.set_data_from_numpy(array)
            inputs.append(item)
        outputs = [triton_aio.InferRequestedOutput(o.name) for o in request.outputs] or None
        try:
            result = await self.triton.infer(
                request.model_name, inputs, model_version=request.model_version, outputs=outputs
            )
        except Exception as exc:
            raise InvalidArgument(str(exc)) from exc
        answer = result.get_response()
        return infer_pb.InferResponse(
            model_name=answer.model_name,
            model_version=answer.model_version,
            id=request.id,
            outputs=[to_tensor(o.name, o.datatype, result.as_numpy(o.name)) for o in answer.outputs],
        )


@pytest.fixture(scope="session")
async def forwarder(triton_grpc: str) -> AsyncIterator[tuple[str, TritonForwarder]]:
    """An InferenceService that forwards to Triton: its host:port, and the servicer."""
    triton = triton_aio.InferenceServerClient(triton_grpc)
    service = infer_pb.DESCRIPTOR.services_by_name["InferenceService"]
    servicer = TritonForwarder(triton)
    server, port = create_server(
        "triton-forwarder",
        ServiceSettings(metrics_enabled=False),
        [ServiceBinding(infer_grpc.add_InferenceServiceServicer_to_server, servicer, service)],
    )
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop()
    await triton.close()


@pytest.fixture(scope="session")
def inference_target(forwarder: tuple[str, TritonForwarder]) -> str:
    """host:port of an InferenceService that forwards to Triton."""
    return forwarder[0]


@pytest.fixture(scope="session")
def s3(s3_endpoint: str, s3_credentials: S3Credentials) -> Iterator[Minio]:
    """A client of the test S3, with the tests' bucket made."""
    http = urllib3.PoolManager(maxsize=8)
    client = Minio(
        s3_endpoint.removeprefix("http://"),
        access_key=s3_credentials.access_key,
        secret_key=s3_credentials.secret_key,
        secure=False,
        region="us-east-1",
        http_client=http,
    )
    for bucket in (BUCKET, SHARED_BUCKET):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    yield client
    http.clear()


@dataclass
class Pipeline:
    """Settings of one batch pipeline: its own topic and consumer group, its workers."""

    backends: dict[str, str]
    worker_options: dict[str, str]
    inference_target: str
    logs: Path
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    metrics_ports: dict[int, int] = field(default_factory=dict)
    """Each worker's metrics port, by process id."""

    @property
    def api_settings(self) -> batch_service.Settings:
        return batch_service.Settings(
            **{k.lower(): v for k, v in self.backends.items()},
            shards_topic=f"batch-tests-{self.run}",
            uploads_uri=f"s3://{BUCKET}/uploads/{{tenant}}/",
            results_uri=f"s3://{BUCKET}/results/{{tenant}}/{{job}}/",
            extra_input_prefixes={"acme": [f"s3://{SHARED_BUCKET}/acme-data/"]},
            shards_in_flight=SHARDS_IN_FLIGHT,
            watch_interval="PT0.2S",
            poll_interval="PT0.5S",
            lease_check_interval="PT0.5S",
            metrics_enabled=False,
        )

    def sibling(self, inference_target: str) -> Pipeline:
        """Another pipeline on the same backends, inferring through `inference_target`."""
        return Pipeline(self.backends, self.worker_options, inference_target, self.logs)

    def start_worker(self) -> subprocess.Popen[bytes]:
        """A `tensorway serve batch-worker` process, tied to this test process's life."""
        metrics_port = self.worker_options.get("METRICS_PORT") or str(free_port())
        worker = {
            **self.backends,
            "METRICS_PORT": metrics_port,
            **self.worker_options,
            "SHARDS_TOPIC": f"batch-tests-{self.run}",
            "CONSUMER_GROUP": f"batch-tests-{self.run}",
            "INFERENCE_TARGET": self.inference_target,
        }
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TENSORWAY_BATCH")},
            **{f"TENSORWAY_BATCH_WORKER_{k}": v for k, v in worker.items()},
            # A killed worker's faust data dir stays among the logs, which the session removes.
            "TMPDIR": str(self.logs),
        }
        log = (self.logs / f"worker-{self.run}-{len(self.workers)}.log").open("wb")
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "tensorway"), "serve", "batch-worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.workers.append(process)
        self.metrics_ports[process.pid] = int(metrics_port)
        return process

    def metrics(self) -> dict[int, Samples | None]:
        """Each running worker's metrics, by process id; None while it does not serve them yet."""
        samples: dict[int, Samples | None] = {}
        for process in self.workers:
            if process.poll() is None:
                try:
                    samples[process.pid] = scrape(
                        f"http://127.0.0.1:{self.metrics_ports[process.pid]}/metrics"
                    )
                except (urllib.error.URLError, ConnectionError):
                    samples[process.pid] = None
        return samples

    def shards_running(self) -> dict[int, float | None]:
        """Each running worker's count of the shard messages it is handling now, by process id."""
        return {
            pid: None if samples is None else samples.get(("tensorway_batch_shards_running", ()))
            for pid, samples in self.metrics().items()
        }

    def consuming(self) -> bool:
        """Whether every running worker serves its metrics and holds partitions of its topic:
        started (SIGTERM stops it gracefully from then on) and in its consumer group."""
        return all(samples is not None and bool(lags(samples)) for samples in self.metrics().values())

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""A /metrics page as {(name, sorted labels): value}."""


def scrape(url: str) -> Samples:
    """A loopback /metrics page of a worker a test started, as {(name, labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def lags(samples: Samples) -> dict[str, float]:
    """A worker's consumer lag by the partition ("topic/partition") it holds."""
    return {
        f"{dict(labels)['topic']}/{dict(labels)['partition']}": value
        for (name, labels), value in samples.items()
        if name == "tensorway_batch_consumer_lag_messages"
    }


@pytest.fixture(scope="session")
def pipeline(
    postgres_url: str,
    kafka_bootstrap: str,
    kafka_session_timeout_ms: int,
    s3_endpoint: str,
    s3_credentials: S3Credentials,
    inference_target: str,
    s3: Minio,
) -> Iterator[Pipeline]:
    """The pipeline most tests share: two workers inferring through the Triton forwarder."""
    backends = {
        "POSTGRES_URL": postgres_url,
        "KAFKA_BOOTSTRAP": kafka_bootstrap,
        "SHARDS_TOPIC_PARTITIONS": "8",
        "S3_ENDPOINT": s3_endpoint,
        "S3_ACCESS_KEY": s3_credentials.access_key,
        "S3_SECRET_KEY": s3_credentials.secret_key,
        "URL_EXPIRY": "PT10M",
    }
    worker_options = {
        "KAFKA_SESSION_TIMEOUT": f"PT{kafka_session_timeout_ms / 1000}S",
        "KAFKA_HEARTBEAT_INTERVAL": "PT0.5S",
        "KAFKA_COMMIT_INTERVAL": "PT0.5S",
        "LEASE_TIMEOUT": LEASE_TIMEOUT,
        "SHARD_CONCURRENCY": "2",
        "LOG_JSON": "false",
    }
    logs = Path(tempfile.mkdtemp(prefix="tensorway-batch-workers-"))
    pipeline = Pipeline(backends, worker_options, inference_target, logs)
    pipeline.start_worker()
    pipeline.start_worker()
    yield pipeline
    pipeline.stop_all()
    shutil.rmtree(logs, ignore_errors=True)


@pytest.fixture(scope="session")
async def batch_api(pipeline: Pipeline) -> AsyncIterator[str]:
    """host:port of the batch API, with its planner, outbox relay and lease reaper running."""
    server, port = await batch_service.create(pipeline.api_settings)
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop()


@pytest.fixture
async def batch(batch_api: str) -> AsyncIterator[pb_grpc.BatchServiceStub]:
    async with grpc.aio.insecure_channel(batch_api) as channel:
        yield pb_grpc.BatchServiceStub(channel)


@pytest.fixture
async def own_store(postgres_url: str) -> AsyncIterator[JobStore]:
    """A JobStore on a database of its own, which no running relay or worker sees."""
    name = f"batch_{uuid.uuid4().hex[:8]}"
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


def tenant(name: str, scopes: tuple[Scope, ...] = TENANT_SCOPES) -> tuple[tuple[str, str], ...]:
    """The identity Envoy would send for a token of tenant `name`."""
    return tuple(identity_metadata(name, scopes))


def upload(s3: Minio, data: bytes, suffix: str, tenant_name: str = "acme") -> str:
    """Put `data` under the tenant's uploads prefix, as its presigned upload would; its s3:// URI."""
    key = f"uploads/{tenant_name}/{uuid.uuid4().hex}{suffix}"
    s3.put_object(BUCKET, key, io.BytesIO(data), len(data))
    return f"s3://{BUCKET}/{key}"


async def poll_job(
    stub: pb_grpc.BatchServiceStub,
    name: str,
    tenant_name: str,
    until: Callable[[pb.Job], bool],
    within: float = 60,
) -> pb.Job:
    """Poll the job until `until(job)` holds; fail the test when that takes longer than `within`."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        job = (await stub.GetJob(pb.GetJobRequest(name=name), metadata=tenant(tenant_name))).job
        if until(job):
            return job
        assert asyncio.get_running_loop().time() < deadline, f"{name}: {job}"
        await asyncio.sleep(0.1)


async def wait_for_state(
    stub: pb_grpc.BatchServiceStub, name: str, tenant_name: str, within: float = 60
) -> pb.Job:
    """Poll until the job has ended."""
    return await poll_job(
        stub,
        name,
        tenant_name,
        lambda job: job.state not in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING),
        within,
    )


def digits_rows(count: int, seed: int = 0) -> np.ndarray:
    """`count` rows the digits model takes: 64 pixel intensities 0-16, as FP32."""
    from sklearn.datasets import load_digits

    pixels = load_digits().data.astype(np.float32)
    picks = np.random.default_rng(seed).integers(0, len(pixels), count)
    return pixels[picks]


async def direct_answers(triton_grpc: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) straight from Triton, 256 rows a request."""
    client = triton_aio.InferenceServerClient(triton_grpc)
    labels, probabilities = [], []
    try:
        for start in range(0, len(rows), 256):
            batch = rows[start : start + 256]
            item = triton_aio.InferInput("input", list(batch.shape), "FP32")
            item.set_data_from_numpy(batch)
            result = await client.infer("digits", [item])
            labels.append(result.as_numpy("label"))
            probabilities.append(result.as_numpy("probabilities"))
    finally:
        await client.close()
    return np.concatenate(labels), np.concatenate(probabilities)
