"""Batch inference throughput: a 200,000-row `digits` job end to end, beside three direct clients
of the same Triton, in one run on one machine.

- batch job: CreateJob → planned into shards → Kafka → `tensorway serve batch-worker` processes →
  the orchestrator (the mesh hop in front of Triton) → result parts in S3 → SUCCEEDED. Timed
  from CreateJob until the job has ended; the input is already in S3, as a batch job's is.
- direct batched: asyncio tritonclient, 256-row requests straight to Triton, with as many in
  flight as the workers allow in total (workers x infer concurrency), answers dropped: the
  issue's baseline, which the 0.8x aim is judged against.
- direct batched + parts: the same, but it also writes what the job writes (the same JSONL
  lines, a part per shard's rows, to the same S3): the like-for-like comparison, printed
  beside the issue's, never instead of it.
- naive: one row per request, one request at a time, over a sample of the rows.

The local stack's PostgreSQL, Kafka (Tansu), S3 (SeaweedFS) and Triton are started here in a
temporary state dir, as are the orchestrator, the batch API and the workers; all are stopped at
the end. The job's time is split into phases from its timestamps, and each timed run shows the
CPU seconds of every process: on a small machine the CPUs, not any one process, set the pace.

    .venv/bin/python bench/batch_bench.py [--rows 200000] [--shard-size 10000] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
import urllib3
from grpc_health.v1 import health_pb2, health_pb2_grpc
from minio import Minio
from sklearn.datasets import load_digits

from tensorway.batch.results import answer_lines
from tensorway.batch.tensors import json_rows
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.devstack import DevStackSettings, Stack

BUCKET = "batch-bench"
TENSORWAY = str(Path(sys.executable).with_name("tensorway"))
ACTIVE = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_serving(address: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise RuntimeError(f"{address} did not become SERVING")


@contextmanager
def serve(service: str, env: dict[str, str], workdir: Path, name: str) -> Iterator[str]:
    """`tensorway serve SERVICE` as its own process; yields its gRPC address."""
    port = free_port()
    with open(workdir / f"{name}.log", "wb") as log:
        process = subprocess.Popen(
            [TENSORWAY, "serve", service, "--port", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, process)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class CpuMeter:
    """CPU seconds this process and everything it started have used since the meter was made,
    by kind of process; from /proc, so Linux only."""

    # What a process's command line holds, for each kind; the first that matches names it.
    KINDS = (
        "batch-worker",
        "serve batch ",
        "orchestrator",
        "tritonserver",
        "triton_python_backend",
        "postgres",
        "tansu",
        "weed",
    )

    def __init__(self) -> None:
        self._start = self._now()

    @classmethod
    def _now(cls) -> dict[int, tuple[str, float]]:
        parents: dict[int, int] = {}
        used: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            pid = int(entry.name)
            # After the command: state, ppid, ..., utime and stime (fields 14 and 15 of stat).
            parents[pid] = int(fields[1])
            used[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        ours = {os.getpid()}
        grew = True
        while grew:
            found = {pid for pid, parent in parents.items() if parent in ours} - ours
            ours |= found
            grew = bool(found)
        return {pid: (cls._kind(pid), used[pid]) for pid in ours if pid in used}

    @classmethod
    def _kind(cls, pid: int) -> str:
        if pid == os.getpid():
            return "bench client"
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() + " "
        except OSError:
            return "other"
        return next((kind.strip() for kind in cls.KINDS if kind in command), "other")

    def since(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, (kind, seconds) in self._now().items():
            before = self._start.get(pid, (kind, 0.0))[1]
            totals[kind] = totals.get(kind, 0.0) + seconds - before
        return totals


def digits_rows(count: int) -> np.ndarray:
    pixels = load_digits().data.astype(np.float32)
    return pixels[np.random.default_rng(0).integers(0, len(pixels), count)]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@dataclass(frozen=True)
class JobRun:
    """A timed job: seconds from CreateJob until WatchJob told its end, and where they went."""

    seconds: float
    job: pb.Job
    phases: dict[str, float]


async def run_job(api: str, input_uri: str, shard_size: int) -> JobRun:
    async with grpc.aio.insecure_channel(api) as channel:
        stub = pb_grpc.BatchServiceStub(channel)
        created = time.time()
        started = time.perf_counter()
        request = pb.CreateJobRequest(
            job=pb.Job(model="digits", input_uri=input_uri, shard_size=shard_size),
            request_id=uuid.uuid4().hex,
        )
        job = (await stub.CreateJob(request)).job
        async for response in stub.WatchJob(pb.WatchJobRequest(name=job.name)):
            job = response.job
        seconds = time.perf_counter() - started
    # The job's times are PostgreSQL's clock, on this machine.
    first_lease, ended = job.start_time.ToNanoseconds() / 1e9, job.end_time.ToNanoseconds() / 1e9
    phases = {
        "CreateJob -> first shard leased": first_lease - created,
        "first shard leased -> job ended": ended - first_lease,
        "job ended -> WatchJob said so": created + seconds - ended,
    }
    return JobRun(seconds, job, phases)


class PartWriter:
    """Writes a direct client's answers to S3 as the batch job writes them: the same JSONL lines,
    a part per `part_rows` rows, each put once its last batch is answered."""

    def __init__(self, s3: Minio, prefix: str, total_rows: int, part_rows: int) -> None:
        self._s3 = s3
        self._prefix = prefix
        self._part_rows = part_rows
        self._total_rows = total_rows
        self._pending: dict[int, dict[int, list[bytes]]] = {}
        self._puts: list[asyncio.Task[None]] = []

    def add(self, start: int, labels: np.ndarray, probabilities: np.ndarray) -> None:
        part = start // self._part_rows
        lines = answer_lines(
            range(start, start + len(labels)),
            {"label": json_rows(labels), "probabilities": json_rows(probabilities)},
        )
        answered = self._pending.setdefault(part, {})
        answered[start] = lines
        part_start = part * self._part_rows
        if sum(map(len, answered.values())) == min(self._part_rows, self._total_rows - part_start):
            data = b"".join(line for _, chunk in sorted(self._pending.pop(part).items()) for line in chunk)
            self._puts.append(asyncio.create_task(asyncio.to_thread(self._put, part, data)))

    def _put(self, part: int, data: bytes) -> None:
        key = f"{self._prefix}part-{part:05d}.jsonl"
        self._s3.put_object(BUCKET, key, io.BytesIO(data), len(data), content_type="application/x-ndjson")

    async def flush(self) -> None:
        await asyncio.gather(*self._puts)


async def direct_batched(
    triton: str, rows: np.ndarray, concurrency: int, part_rows: int, output: PartWriter | None = None
) -> float:
    """Seconds for all rows, up to 256 rows a request (a request never spans two parts, as it
    never spans two shards), `concurrency` requests in flight; with `output`, the answers are
    also written as the batch job's parts."""
    client = triton_aio.InferenceServerClient(triton)
    starts = iter(
        (start, min(start + 256, part + part_rows, len(rows)))
        for part in range(0, len(rows), part_rows)
        for start in range(part, min(part + part_rows, len(rows)), 256)
    )

    async def worker() -> None:
        for start, end in starts:
            chunk = rows[start:end]
            item = triton_aio.InferInput("input", list(chunk.shape), "FP32")
            item.set_data_from_numpy(chunk)
            result = await client.infer("digits", [item])
            labels, probabilities = result.as_numpy("label"), result.as_numpy("probabilities")
            if output is not None:
                output.add(start, labels, probabilities)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if output is not None:
            await output.flush()
        return time.perf_counter() - started
    finally:
        await client.close()


async def naive(triton: str, rows: np.ndarray) -> float:
    """Seconds for the rows, one row a request, one request at a time."""
    client = triton_aio.InferenceServerClient(triton)
    try:
        started = time.perf_counter()
        for row in rows:
            item = triton_aio.InferInput("input", [1, 64], "FP32")
            item.set_data_from_numpy(row[None])
            await client.infer("digits", [item])
        return time.perf_counter() - started
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1, help="batch worker processes")
    parser.add_argument("--infer-concurrency", type=int, default=8, help="requests in flight per worker")
    parser.add_argument("--naive-rows", type=int, default=2_000, help="rows the naive loop is timed over")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tensorway-batch-bench-"))
    workdir.chmod(0o755)  # PostgreSQL runs as an unprivileged user when this runs as root
    settings = DevStackSettings(state_dir=workdir / "stack").without_pinned_ports()
    stack = Stack(settings, state_dir=workdir / "stack", die_with_parent=True)
    try:
        with ExitStack() as running:
            endpoints = stack.ensure(["postgres", "kafka", "s3", "triton"]).endpoints()
            triton = endpoints["triton_grpc"].address
            s3_url = endpoints["s3"].url or ""
            backends = {
                "POSTGRES_URL": endpoints["postgres"].url or "",
                "KAFKA_BOOTSTRAP": endpoints["kafka"].address,
                "SHARDS_TOPIC": "bench-shards",
                "S3_ENDPOINT": s3_url,
                "S3_ACCESS_KEY": settings.s3_access_key,
                "S3_SECRET_KEY": settings.s3_secret_key,
                "METRICS_ENABLED": "false",
                "LOG_LEVEL": "WARNING",
            }
            orchestrator = running.enter_context(
                serve(
                    "orchestrator",
                    {
                        "TENSORWAY_ORCHESTRATOR_TRITONS": json.dumps([triton]),
                        "TENSORWAY_ORCHESTRATOR_METRICS_ENABLED": "false",
                        "TENSORWAY_ORCHESTRATOR_LOG_LEVEL": "WARNING",
                    },
                    workdir,
                    "orchestrator",
                )
            )
            api = running.enter_context(
                serve(
                    "batch",
                    {
                        **{f"TENSORWAY_BATCH_{k}": v for k, v in backends.items()},
                        "TENSORWAY_BATCH_DEFAULT_OUTPUT_PREFIX": f"s3://{BUCKET}/results/{{job}}/",
                    },
                    workdir,
                    "batch",
                )
            )
            for number in range(args.workers):
                worker_env = {
                    **backends,
                    "INFERENCE_TARGET": orchestrator,
                    "INFER_CONCURRENCY": str(args.infer_concurrency),
                    "KAFKA_SESSION_TIMEOUT": "PT6S",
                }
                running.enter_context(
                    serve(
                        "batch-worker",
                        {f"TENSORWAY_BATCH_WORKER_{k}": v for k, v in worker_env.items()},
                        workdir,
                        f"worker-{number}",
                    )
                )

            http = urllib3.PoolManager(maxsize=4)
            s3 = Minio(
                s3_url.removeprefix("http://"),
                access_key=settings.s3_access_key,
                secret_key=settings.s3_secret_key,
                secure=False,
                http_client=http,
            )
            if not s3.bucket_exists(BUCKET):
                s3.make_bucket(BUCKET)
            rows = digits_rows(args.rows)
            for key, array in (("inputs/digits.npy", rows), ("inputs/warmup.npy", rows[:2_000])):
                data = npy_bytes(array)
                s3.put_object(BUCKET, key, io.BytesIO(data), len(data))
            http.clear()

            concurrency = args.workers * args.infer_concurrency
            print(
                f"{os.cpu_count()} CPUs; {args.rows} rows of digits; {args.workers} worker(s); "
                f"{concurrency} requests in flight; shards of {args.shard_size} rows"
            )
            # The warm-up job waits out the consumer group's first join and loads every path once.
            asyncio.run(run_job(api, f"s3://{BUCKET}/inputs/warmup.npy", 500))
            asyncio.run(direct_batched(triton, rows[:2_000], concurrency, part_rows=2_000))

            cpu = CpuMeter()
            run = asyncio.run(run_job(api, f"s3://{BUCKET}/inputs/digits.npy", args.shard_size))
            cpu_used = {"batch job": cpu.since()}
            batch_seconds, job = run.seconds, run.job
            if job.state != pb.JOB_STATE_SUCCEEDED or job.progress.rows_done != args.rows:
                print(
                    f"the batch job ended {pb.JobState.Name(job.state)}: {job.failure_reason}",
                    file=sys.stderr,
                )
                return 1
            # The baseline: the same requests as the batch job, and no answer kept.
            cpu = CpuMeter()
            direct_seconds = asyncio.run(direct_batched(triton, rows, concurrency, part_rows=len(rows)))
            cpu_used["direct"] = cpu.since()
            output = PartWriter(s3, "direct/", len(rows), args.shard_size)
            cpu = CpuMeter()
            writing_seconds = asyncio.run(direct_batched(triton, rows, concurrency, args.shard_size, output))
            cpu_used["direct + parts"] = cpu.since()
            naive_seconds = asyncio.run(naive(triton, rows[: args.naive_rows]))
    finally:
        stack.down()
        shutil.rmtree(workdir, ignore_errors=True)

    batch_rate = args.rows / batch_seconds
    direct_rate = args.rows / direct_seconds
    writing_rate = args.rows / writing_seconds
    naive_rate = args.naive_rows / naive_seconds
    print(f"{'client':<46}{'rows/s':>12}{'seconds':>10}{'CPU s':>8}")
    table = (
        ("batch job (end to end)", batch_rate, batch_seconds, "batch job"),
        ("direct batched, answers dropped (issue's)", direct_rate, direct_seconds, "direct"),
        ("direct batched + the same parts in S3 (fair)", writing_rate, writing_seconds, "direct + parts"),
    )
    for name, rate, seconds, measured in table:
        print(f"{name:<46}{rate:>12,.0f}{seconds:>10.2f}{sum(cpu_used[measured].values()):>8.2f}")
    print(
        f"{'naive (1 row/request)':<46}{naive_rate:>12,.0f}{naive_seconds:>10.2f}  ({args.naive_rows} rows)"
    )
    print(
        f"batch / direct batched, answers dropped: {batch_rate / direct_rate:.2f}x (the issue's aim: >= 0.8x)"
    )
    print(
        f"batch / direct batched + the same parts: {batch_rate / writing_rate:.2f}x "
        "(NOT the issue's baseline: this direct client also writes the job's output)"
    )
    print(f"batch / naive:                           {batch_rate / naive_rate:.1f}x (aim >= 50x)")
    print("the batch job's time:")
    for phase, seconds in run.phases.items():
        print(f"  {phase:<34}{seconds:>8.2f} s")
    print("CPU seconds by process (all on this machine's CPUs):")
    for measured, used in cpu_used.items():
        busiest = sorted(used.items(), key=lambda item: -item[1])
        print(
            f"  {measured:<16}"
            + ", ".join(f"{name} {seconds:.2f}" for name, seconds in busiest if seconds >= 0.01)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
