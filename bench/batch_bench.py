"""Batch inference throughput: a 200,000-row `digits` job end to end, beside three direct clients
of the same Triton, in one run on one machine.

- batch job: CreateJob → planned into shards → Kafka → `tensorway serve batch-worker` processes →
  the orchestrator (the mesh hop in front of Triton) → result parts in S3 → SUCCEEDED. Timed
  from CreateJob until the job has ended; the input is already in S3, as a batch job's is.
- direct batched: asyncio tritonclient, 256-row requests straight to Triton, answers dropped, at
  each concurrency of the sweep and at as many in flight as the workers allow in total (workers x
  infer concurrency): the issue's baseline, which the 0.8x aim is judged against.
- direct batched + parts: the same, but it also writes what the job writes (the same JSONL
  lines, a part per shard's rows, to the same S3): the like-for-like comparison, printed
  beside the issue's, never instead of it.
- naive: one row per request, one request at a time, over a sample of the rows.

The local stack's PostgreSQL, Kafka (Tansu), S3 (SeaweedFS) and Triton are started here in a
temporary state dir, as are the orchestrator, the batch API and the workers; all are stopped at
the end. The job's time is split into phases from its timestamps, and each timed run shows the
CPU seconds of every process: on a small machine the CPUs, not any one process, set the pace.

    .venv/bin/python bench/batch_bench.py [--quick] [--json PATH] [--rows 200000] [--shard-size 10000]
        [--workers 1] [--concurrency 1 4 16 64]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
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
from benchkit import Cell, Results, add_common_arguments, mode, percentile_ms, prefixed, serve
from minio import Minio
from sklearn.datasets import load_digits

from tensorway.batch.results import answer_lines
from tensorway.batch.tensors import json_rows
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.devstack import DevStackSettings, Stack
from tensorway.runtime.context import TENANT_SCOPES, identity_metadata

BUCKET = "batch-bench"
# The bench's jobs are a tenant's, with a tenant token's identity, and read from its prefix.
IDENTITY = tuple(identity_metadata("bench", TENANT_SCOPES))
INPUTS = "uploads/bench/"
BATCHED = "digits, up to 256 rows a request"
ONE_ROW = "digits, 1 row a request"
DIRECT = "direct batched (Triton)"
# Full run, then --quick: rows in the job, rows a shard, rows the naive loop is timed over.
SIZES = {"full": (200_000, 10_000, 2_000), "quick": (20_000, 2_000, 200)}
ACTIVE = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)


@contextmanager
def service(name: str, settings: dict[str, str], workdir: Path, log_name: str | None = None) -> Iterator[str]:
    with serve(name, prefixed(name, settings), workdir / f"{log_name or name}.log") as address:
        yield address


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
        job = (await stub.CreateJob(request, metadata=IDENTITY)).job
        async for response in stub.WatchJob(pb.WatchJobRequest(name=job.name), metadata=IDENTITY):
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
) -> tuple[float, list[float]]:
    """Seconds for all rows and each request's latency, up to 256 rows a request (a request never
    spans two parts, as it never spans two shards), `concurrency` requests in flight; with
    `output`, the answers are also written as the batch job's parts."""
    client = triton_aio.InferenceServerClient(triton)
    starts = iter(
        (start, min(start + 256, part + part_rows, len(rows)))
        for part in range(0, len(rows), part_rows)
        for start in range(part, min(part + part_rows, len(rows)), 256)
    )

    latencies: list[float] = []

    async def worker() -> None:
        for start, end in starts:
            chunk = rows[start:end]
            item = triton_aio.InferInput("input", list(chunk.shape), "FP32")
            item.set_data_from_numpy(chunk)
            sent = time.perf_counter()
            result = await client.infer("digits", [item])
            latencies.append(time.perf_counter() - sent)
            labels, probabilities = result.as_numpy("label"), result.as_numpy("probabilities")
            if output is not None:
                output.add(start, labels, probabilities)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if output is not None:
            await output.flush()
        return time.perf_counter() - started, latencies
    finally:
        await client.close()


async def naive(triton: str, rows: np.ndarray) -> tuple[float, list[float]]:
    """Seconds for the rows and each request's latency, one row a request, one request at a time."""
    client = triton_aio.InferenceServerClient(triton)
    latencies: list[float] = []
    try:
        started = time.perf_counter()
        for row in rows:
            item = triton_aio.InferInput("input", [1, 64], "FP32")
            item.set_data_from_numpy(row[None])
            sent = time.perf_counter()
            await client.infer("digits", [item])
            latencies.append(time.perf_counter() - sent)
        return time.perf_counter() - started, latencies
    finally:
        await client.close()


def rows_cell(
    group: str, path: str, concurrency: int, rows: int, seconds: float, latencies: list[float]
) -> Cell:
    """A cell whose throughput is rows per second; latencies (of requests) where it has them."""
    return Cell(
        group=group,
        path=path,
        concurrency=concurrency,
        seconds=seconds,
        throughput=rows / seconds,
        requests=len(latencies) or None,
        p50_ms=percentile_ms(latencies, 50),
        p99_ms=percentile_ms(latencies, 99),
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, seconds=False)
    parser.add_argument("--rows", type=int, help="rows in the job (default: full 200,000, quick 20,000)")
    parser.add_argument("--shard-size", type=int, help="rows a shard (default: full 10,000, quick 2,000)")
    parser.add_argument("--workers", type=int, default=1, help="batch worker processes")
    parser.add_argument("--infer-concurrency", type=int, default=8, help="requests in flight per worker")
    parser.add_argument(
        "--naive-rows", type=int, help="rows the naive loop is timed over (default: full 2,000, quick 200)"
    )
    args = parser.parse_args()
    default_rows, default_shard, default_naive = SIZES[mode(args)]
    total_rows = args.rows or default_rows
    shard_size = args.shard_size or default_shard
    naive_rows = args.naive_rows or default_naive
    in_flight = args.workers * args.infer_concurrency
    results = Results(
        benchmark="batch",
        title="Batch: a digits job end to end beside direct clients of the same Triton",
        mode=mode(args),
        baseline=DIRECT,
        throughput_unit="rows/s",
        settings={
            "rows": total_rows,
            "shard size": shard_size,
            "workers": args.workers,
            "requests in flight per worker": args.infer_concurrency,
            "naive rows": naive_rows,
            "concurrency": args.concurrency,
        },
    )
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
                service(
                    "orchestrator",
                    {"TRITONS": json.dumps([triton]), "METRICS_ENABLED": "false", "LOG_LEVEL": "WARNING"},
                    workdir,
                )
            )
            api = running.enter_context(
                service(
                    "batch",
                    {
                        **backends,
                        "UPLOADS_URI": f"s3://{BUCKET}/uploads/{{tenant}}/",
                        "RESULTS_URI": f"s3://{BUCKET}/results/{{tenant}}/{{job}}/",
                    },
                    workdir,
                )
            )
            for number in range(args.workers):
                worker_settings = {
                    **backends,
                    "INFERENCE_TARGET": orchestrator,
                    "INFER_CONCURRENCY": str(args.infer_concurrency),
                    "KAFKA_SESSION_TIMEOUT": "PT6S",
                }
                running.enter_context(service("batch-worker", worker_settings, workdir, f"worker-{number}"))

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
            rows = digits_rows(total_rows)
            for key, array in ((f"{INPUTS}digits.npy", rows), (f"{INPUTS}warmup.npy", rows[:2_000])):
                data = npy_bytes(array)
                s3.put_object(BUCKET, key, io.BytesIO(data), len(data))
            http.clear()

            print(
                f"{os.cpu_count()} CPUs; {total_rows} rows of digits; {args.workers} worker(s); "
                f"{in_flight} requests in flight; shards of {shard_size} rows"
            )
            # The warm-up job waits out the consumer group's first join and loads every path once.
            asyncio.run(run_job(api, f"s3://{BUCKET}/{INPUTS}warmup.npy", 500))
            asyncio.run(direct_batched(triton, rows[:2_000], in_flight, part_rows=2_000))

            cpu = CpuMeter()
            run = asyncio.run(run_job(api, f"s3://{BUCKET}/{INPUTS}digits.npy", shard_size))
            cpu_used = {"batch job": cpu.since()}
            job = run.job
            if job.state != pb.JOB_STATE_SUCCEEDED or job.progress.rows_done != total_rows:
                print(
                    f"the batch job ended {pb.JobState.Name(job.state)}: {job.failure_reason}",
                    file=sys.stderr,
                )
                return 1
            job_cell = rows_cell(BATCHED, "batch job (end to end)", in_flight, total_rows, run.seconds, [])
            job_cell.extra["CPU s"] = sum(cpu_used["batch job"].values())
            results.cells.append(job_cell)
            # The baseline: the same requests as the batch job, and no answer kept.
            for concurrency in sorted({*args.concurrency, in_flight}):
                cpu = CpuMeter()
                seconds, latencies = asyncio.run(
                    direct_batched(triton, rows, concurrency, part_rows=len(rows))
                )
                cell = rows_cell(BATCHED, DIRECT, concurrency, total_rows, seconds, latencies)
                used = cpu.since()
                cell.extra["CPU s"] = sum(used.values())
                if concurrency == in_flight:
                    cpu_used["direct"] = used
                results.cells.append(cell)
            output = PartWriter(s3, "direct/", len(rows), shard_size)
            cpu = CpuMeter()
            seconds, latencies = asyncio.run(direct_batched(triton, rows, in_flight, shard_size, output))
            cpu_used["direct + parts"] = cpu.since()
            cell = rows_cell(
                BATCHED, "direct batched + the same parts in S3", in_flight, total_rows, seconds, latencies
            )
            cell.extra["CPU s"] = sum(cpu_used["direct + parts"].values())
            results.cells.append(cell)
            seconds, latencies = asyncio.run(naive(triton, rows[:naive_rows]))
            results.cells.append(
                rows_cell(ONE_ROW, "naive (Triton direct)", 1, naive_rows, seconds, latencies)
            )
    finally:
        stack.down()
        shutil.rmtree(workdir, ignore_errors=True)

    results.cells.sort(key=lambda cell: (cell.group, cell.concurrency, cell.path != DIRECT))
    by_path = {cell.path: cell for cell in results.cells if cell.concurrency in (in_flight, 1)}
    batch_rate = by_path["batch job (end to end)"].throughput
    direct_rate = next(c.throughput for c in results.cells if c.path == DIRECT and c.concurrency == in_flight)
    writing_rate = by_path["direct batched + the same parts in S3"].throughput
    naive_rate = by_path["naive (Triton direct)"].throughput
    results.aim(
        "batch job >= 0.8x direct batched (answers dropped, same requests in flight)",
        f"{batch_rate / direct_rate:.3f}x",
        batch_rate >= 0.8 * direct_rate,
    )
    results.aim("batch job >= 50x naive", f"{batch_rate / naive_rate:.2f}x", batch_rate >= 50 * naive_rate)
    results.notes.append(
        f"batch / direct batched + the same parts: {batch_rate / writing_rate:.2f}x"
        " (NOT the issue's baseline: this direct client also writes the job's output)"
    )
    results.notes.append(
        "the batch job's time: "
        + "; ".join(f"{phase} {seconds:.2f} s" for phase, seconds in run.phases.items())
    )
    for measured, used in cpu_used.items():
        busiest = sorted(used.items(), key=lambda item: -item[1])
        results.notes.append(
            f"CPU seconds by process, {measured}: "
            + ", ".join(f"{name} {seconds:.2f}" for name, seconds in busiest if seconds >= 0.01)
        )
    results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
