"""Batch inference throughput: 200,000-row `digits` jobs (JSONL in and out, Parquet in and out)
end to end on the deployed path, beside direct clients of the same Triton, in one run on one
machine; then a 10-million-row Parquet job, for the workers' peak memory.

- batch job: CreateJob → planned into shards → Kafka → `tensorway serve batch-worker` processes →
  the router (global limits counted through Redis leases) → the orchestrator → Triton → result
  parts in S3 → SUCCEEDED: the path compose and Kubernetes run. Timed from CreateJob until the
  job has ended; the input is already in S3, as a batch job's is. The bench tenant has limits
  of the shipped shape but high enough never to refuse (the shipped 100,000 rows a minute
  would hold a 200,000-row job for two minutes): its requests are counted, not throttled.
- direct batched: asyncio tritonclient, requests of the model's max batch (1,024 rows, as the
  workers send) straight to Triton, answers dropped, at
  each concurrency of the sweep and at as many in flight as the workers allow in total (workers x
  infer concurrency): the issue's baseline, which the 0.8x aim is judged against.
- direct batched + parts: the same, but it also writes what the job writes (the same JSONL
  lines or Parquet parts, a part per shard's rows, to the same S3): the fair baseline.
- floor: the fair baseline sent through two bare Python proxies chained (`hopfloor.py`), where
  the job's router and orchestrator stand: what two hops with no logic at all cost this
  workload, so the job is also read against what any path through two Python hops can reach.
- naive: one row per request, one request at a time, over a sample of the rows.
- memory: a Parquet input of --big-rows rows (10,000,000; --quick 1,000,000), generated here in
  files of 1,000,000 rows under one prefix (never stored in the repo), run as one job; each
  worker's peak RSS (VmHWM) before and after it, against the bound the aim states.

The local stack's PostgreSQL, Kafka (Tansu), S3 (SeaweedFS) and Triton are started here in a
temporary state dir, as are the orchestrator, the batch API and the workers; all are stopped at
the end. The job's time is split into phases from its timestamps, and each timed run shows the
CPU seconds of every process: on a small machine the CPUs, not any one process, set the pace.

    .venv/bin/python bench/batch_bench.py [--quick] [--json PATH] [--rows 200000] [--shard-size 10000]
        [--workers 1] [--concurrency 1 4 16 64] [--big-rows 10000000]
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
import pyarrow as pa
import pyarrow.parquet as pq
import tritonclient.grpc.aio as triton_aio
import urllib3
from benchkit import Cell, Results, add_common_arguments, mode, percentile_ms, prefixed, serve
from hopfloor import bare_proxy
from minio import Minio
from sklearn.datasets import load_digits

from tensorway.batch.parquet import AnsweredRows, parquet_bytes, part_table
from tensorway.batch.results import answer_lines
from tensorway.batch.tensors import json_rows
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.devstack import DevStackSettings, Stack, register_demo_models
from tensorway.devstack._services import Router
from tensorway.devstack._stack import default_components
from tensorway.runtime.context import TENANT_SCOPES, identity_metadata
from tensorway.tensors.signatures import TensorSpec

BUCKET = "batch-bench"
TENANT = "bench"
# The bench's jobs are a tenant's, with a tenant token's identity, and read from its prefix.
IDENTITY = tuple(identity_metadata(TENANT, TENANT_SCOPES))
INPUTS = f"uploads/{TENANT}/"
# The demo digits model's max_batch_size, which the workers' requests take by default: the direct
# clients send requests of the same size, so both sides pay the same per-request costs.
BATCH_ROWS = 1024
BATCHED = f"digits, up to {BATCH_ROWS:,} rows a request"
ONE_ROW = "digits, 1 row a request"
DIRECT = "direct batched (Triton)"
FLOOR = "floor: direct batched + the same {} parts, through 2 bare proxies"
# Full run, then --quick: rows in a job, rows a shard, rows the naive loop is timed over, rows
# of the memory job.
SIZES = {"full": (200_000, 10_000, 2_000, 10_000_000), "quick": (20_000, 2_000, 200, 1_000_000)}
BIG_FILE_ROWS = 1_000_000
BIG_SHARD_ROWS = 10_000
# What a worker may hold at its peak, whatever the input's size: the interpreter with grpc,
# faust and pyarrow (about 200 MB), and its shards in flight, each a few MB of rows and answers.
RSS_BOUND_MB = 600
OUTPUTS = (TensorSpec("label", "INT64", ()), TensorSpec("probabilities", "FP32", (10,)))
ACTIVE = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)


def bench_limits() -> dict[str, object]:
    """The router's shipped limits, and the bench tenant's own, of the same shape but high
    enough never to refuse: every request is still counted through the Redis leases."""
    shipped: list[dict[str, object]] = [
        {"name": "tenant-requests", "match": {"tenant": "*"}, "limit": 200, "per": "second"},
        {"name": "tenant-rows", "match": {"tenant": "*"}, "cost": "rows", "limit": 100_000, "per": "minute"},
        {"name": "tenant-bytes", "match": {"tenant": "*"}, "cost": "bytes", "limit": 2**30, "per": "minute"},
        {"name": "model-requests", "match": {"model": "*"}, "limit": 10**8, "per": "second"},
    ]
    bench: list[dict[str, object]] = [
        {"name": "bench-requests", "match": {"tenant": TENANT}, "limit": 10**8, "per": "second"},
        {"name": "bench-rows", "match": {"tenant": TENANT}, "cost": "rows", "limit": 10**11, "per": "minute"},
        {
            "name": "bench-bytes",
            "match": {"tenant": TENANT},
            "cost": "bytes",
            "limit": 10**14,
            "per": "minute",
        },
    ]
    return {"limits": shipped + bench}


@contextmanager
def service(name: str, settings: dict[str, str], workdir: Path, log_name: str | None = None) -> Iterator[str]:
    with serve(name, prefixed(name, settings), workdir / f"{log_name or name}.log") as address:
        yield address


def _descendants() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
    ours = {os.getpid()}
    grew = True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in ours} - ours
        ours |= found
        grew = bool(found)
    return {pid: parents[pid] for pid in ours - {os.getpid()}}


def worker_memory() -> dict[int, tuple[float, float]]:
    """(peak RSS, RSS) in MB of each batch worker process this bench started, from
    /proc/PID/status (VmHWM, VmRSS)."""
    found: dict[int, tuple[float, float]] = {}
    for pid in _descendants():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"serve batch-worker" not in command:
                continue
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":" in line
            )
        except OSError:
            continue
        found[pid] = (int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024)
    return found


class CpuMeter:
    """CPU seconds this process and everything it started have used since the meter was made,
    by kind of process; from /proc, so Linux only."""

    # What a process's command line holds, for each kind; the first that matches names it.
    KINDS = (
        "batch-worker",
        "serve batch ",
        "orchestrator",
        "router",
        "registry",
        "tritonserver",
        "triton_python_backend",
        "postgres",
        "redis",
        "tansu",
        "weed",
        "hopfloor",
    )

    def __init__(self) -> None:
        self._start = self._now()

    @classmethod
    def _now(cls) -> dict[int, tuple[str, float]]:
        used: dict[int, float] = {}
        for pid in [os.getpid(), *_descendants()]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            # After the command: state, ppid, ..., utime and stime (fields 14 and 15 of stat).
            used[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return {pid: (cls._kind(pid), seconds) for pid, seconds in used.items()}

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


def digits_rows(count: int, seed: int = 0) -> np.ndarray:
    pixels = load_digits().data.astype(np.float32)
    return pixels[np.random.default_rng(seed).integers(0, len(pixels), count)]


def jsonl_bytes(rows: np.ndarray) -> bytes:
    """{"id": i, "inputs": {"input": [...]}} a line, as a JSONL input holds them."""
    return b"".join(
        b'{"id":%d,"inputs":{"input":%b}}\n' % (i, line) for i, line in enumerate(json_rows(rows))
    )


def pixels_column(rows: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def parquet_input(rows: np.ndarray, first_id: int, row_group: int) -> bytes:
    table = pa.table({"id": np.arange(first_id, first_id + len(rows)), "input": pixels_column(rows)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group)
    return buffer.getvalue()


def put(s3: Minio, key: str, data: bytes) -> None:
    s3.put_object(BUCKET, key, io.BytesIO(data), len(data))


def write_big_input(s3: Minio, rows: int, workdir: Path) -> str:
    """`rows` rows of digits as Parquet files of BIG_FILE_ROWS rows (row groups of a shard each)
    under one prefix, each written through a local file, so neither side holds them whole."""
    prefix = f"{INPUTS}big-{uuid.uuid4().hex[:8]}/"
    pixels = load_digits().data.astype(np.float32)
    rng = np.random.default_rng(1)
    schema = pa.schema([("id", pa.int64()), ("input", pa.list_(pa.float32(), 64))])
    for number, first in enumerate(range(0, rows, BIG_FILE_ROWS)):
        path = workdir / "big.parquet"
        count = min(BIG_FILE_ROWS, rows - first)
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, count, BIG_SHARD_ROWS):
                chunk = pixels[rng.integers(0, len(pixels), min(BIG_SHARD_ROWS, count - start))]
                ids = np.arange(first + start, first + start + len(chunk))
                writer.write_table(pa.table({"id": ids, "input": pixels_column(chunk)}, schema=schema))
        s3.fput_object(BUCKET, f"{prefix}part-{number:04d}.parquet", str(path))
        path.unlink()
    return f"s3://{BUCKET}/{prefix}"


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
    """Writes a direct client's answers to S3 as the batch job writes them: the same JSONL lines
    or Parquet parts, a part per `part_rows` rows, each put once its last batch is answered."""

    def __init__(self, s3: Minio, prefix: str, total_rows: int, part_rows: int, parquet: bool) -> None:
        self._s3 = s3
        self._prefix = prefix
        self._part_rows = part_rows
        self._total_rows = total_rows
        self._parquet = parquet
        self._pending: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self._puts: list[asyncio.Task[None]] = []

    def add(self, start: int, labels: np.ndarray, probabilities: np.ndarray) -> None:
        part = start // self._part_rows
        answered = self._pending.setdefault(part, {})
        answered[start] = (labels, probabilities)
        part_start = part * self._part_rows
        rows = min(self._part_rows, self._total_rows - part_start)
        if sum(len(labels) for labels, _ in answered.values()) == rows:
            batches = sorted(self._pending.pop(part).items())
            self._puts.append(
                asyncio.create_task(asyncio.to_thread(self._put, part, part_start, rows, batches))
            )

    def _put(
        self, part: int, part_start: int, rows: int, batches: list[tuple[int, tuple[np.ndarray, ...]]]
    ) -> None:
        if self._parquet:
            pieces = [
                AnsweredRows(
                    range(start, start + len(labels)),
                    pa.array(np.arange(start, start + len(labels))),
                    {"label": labels, "probabilities": probabilities},
                )
                for start, (labels, probabilities) in batches
            ]
            table = part_table(
                part_start, rows, answered=pieces, errors=[], ids=None, id_name="id", outputs=OUTPUTS
            )
            data, suffix, content_type = parquet_bytes(table), ".parquet", "application/vnd.apache.parquet"
        else:
            data = b"".join(
                line
                for start, (labels, probabilities) in batches
                for line in answer_lines(
                    range(start, start + len(labels)),
                    {"label": json_rows(labels), "probabilities": json_rows(probabilities)},
                )
            )
            suffix, content_type = ".jsonl", "application/x-ndjson"
        key = f"{self._prefix}part-{part:05d}{suffix}"
        self._s3.put_object(BUCKET, key, io.BytesIO(data), len(data), content_type=content_type)

    async def flush(self) -> None:
        await asyncio.gather(*self._puts)


async def direct_batched(
    triton: str, rows: np.ndarray, concurrency: int, part_rows: int, output: PartWriter | None = None
) -> tuple[float, list[float]]:
    """Seconds for all rows and each request's latency, up to BATCH_ROWS a request (a request never
    spans two parts, as it never spans two shards), `concurrency` requests in flight; with
    `output`, the answers are also written as the batch job's parts."""
    client = triton_aio.InferenceServerClient(triton)
    starts = iter(
        (start, min(start + BATCH_ROWS, part + part_rows, len(rows)))
        for part in range(0, len(rows), part_rows)
        for start in range(part, min(part + part_rows, len(rows)), BATCH_ROWS)
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


async def model_max_batch(triton: str) -> int:
    """The digits model's max_batch_size as Triton serves it: the rows of the workers' requests."""
    client = triton_aio.InferenceServerClient(triton)
    try:
        return int((await client.get_model_config("digits")).config.max_batch_size)
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
    parser.add_argument("--rows", type=int, help="rows in a job (default: full 200,000, quick 20,000)")
    parser.add_argument("--shard-size", type=int, help="rows a shard (default: full 10,000, quick 2,000)")
    parser.add_argument("--workers", type=int, default=1, help="batch worker processes")
    parser.add_argument("--infer-concurrency", type=int, default=8, help="requests in flight per worker")
    parser.add_argument(
        "--naive-rows", type=int, help="rows the naive loop is timed over (default: full 2,000, quick 200)"
    )
    parser.add_argument(
        "--big-rows", type=int, help="rows of the memory job (default: full 10,000,000, quick 1,000,000)"
    )
    args = parser.parse_args()
    default_rows, default_shard, default_naive, default_big = SIZES[mode(args)]
    total_rows = args.rows or default_rows
    shard_size = args.shard_size or default_shard
    naive_rows = args.naive_rows or default_naive
    big_rows = args.big_rows if args.big_rows is not None else default_big
    in_flight = args.workers * args.infer_concurrency
    results = Results(
        benchmark="batch",
        title="Batch: digits jobs on the deployed path beside direct clients of the same Triton",
        mode=mode(args),
        baseline=DIRECT,
        throughput_unit="rows/s",
        settings={
            "rows": total_rows,
            "shard size": shard_size,
            "workers": args.workers,
            "requests in flight per worker": args.infer_concurrency,
            "naive rows": naive_rows,
            "memory job rows": big_rows,
            "concurrency": args.concurrency,
        },
    )
    workdir = Path(tempfile.mkdtemp(prefix="tensorway-batch-bench-"))
    workdir.chmod(0o755)  # PostgreSQL runs as an unprivileged user when this runs as root
    limits = workdir / "limits.json"
    limits.write_text(json.dumps(bench_limits()))
    settings = DevStackSettings(state_dir=workdir / "stack").without_pinned_ports()
    components = [Router(limits_file=limits) if c.name == "router" else c for c in default_components()]
    stack = Stack(settings, state_dir=workdir / "stack", components=components, die_with_parent=True)
    cpu_used: dict[str, dict[str, float]] = {}
    runs: dict[str, JobRun] = {}
    memory: dict[str, dict[int, tuple[float, float]]] = {}
    big: JobRun | None = None
    try:
        with ExitStack() as running:
            state = stack.up(["router", "kafka", "s3"])
            register_demo_models(state)
            addresses = state.addresses()
            endpoints = stack.ensure(["postgres", "kafka", "s3", "triton"]).endpoints()
            triton = endpoints["triton_grpc"].address
            router = addresses["router"]
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
                    # The deployed path: compose and the Kubernetes overlays point workers at routers.
                    "INFERENCE_TARGET": router,
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
            inputs = {
                "JSONL": (f"{INPUTS}digits.jsonl", jsonl_bytes(rows)),
                "Parquet": (f"{INPUTS}digits.parquet", parquet_input(rows, 0, shard_size)),
            }
            for key, data in inputs.values():
                put(s3, key, data)
            put(s3, f"{INPUTS}warmup.jsonl", jsonl_bytes(rows[:2_000]))
            put(s3, f"{INPUTS}warmup.parquet", parquet_input(rows[:2_000], 0, 500))

            print(
                f"{os.cpu_count()} CPUs; {total_rows} rows of digits; {args.workers} worker(s) through the "
                f"router; {in_flight} requests in flight; shards of {shard_size} rows; memory job "
                f"of {big_rows} rows"
            )
            served_batch = asyncio.run(model_max_batch(triton))
            if served_batch != BATCH_ROWS:
                print(
                    f"digits takes {served_batch} rows a request, not {BATCH_ROWS}: the direct clients "
                    "would not send the workers' requests",
                    file=sys.stderr,
                )
                return 1
            # The warm-up jobs wait out the consumer group's first join and load every path once.
            for warmup in ("warmup.jsonl", "warmup.parquet"):
                asyncio.run(run_job(api, f"s3://{BUCKET}/{INPUTS}{warmup}", 500))
            asyncio.run(direct_batched(triton, rows[:2_000], in_flight, part_rows=2_000))

            for name, (key, _) in inputs.items():
                cpu = CpuMeter()
                run = asyncio.run(run_job(api, f"s3://{BUCKET}/{key}", shard_size))
                cpu_used[f"batch job, {name}"] = cpu.since()
                job = run.job
                if job.state != pb.JOB_STATE_SUCCEEDED or job.progress.rows_done != total_rows:
                    print(
                        f"the {name} batch job ended {pb.JobState.Name(job.state)}: {job.failure_reason}",
                        file=sys.stderr,
                    )
                    return 1
                runs[name] = run
                cell = rows_cell(
                    BATCHED, f"batch job, {name} (end to end)", in_flight, total_rows, run.seconds, []
                )
                cell.extra["CPU s"] = sum(cpu_used[f"batch job, {name}"].values())
                results.cells.append(cell)
            memory[f"after the {total_rows:,}-row jobs"] = worker_memory()
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

            def with_parts(target: str, path: str, prefix: str, parquet: bool) -> None:
                output = PartWriter(s3, prefix, len(rows), shard_size, parquet=parquet)
                cpu = CpuMeter()
                seconds, latencies = asyncio.run(direct_batched(target, rows, in_flight, shard_size, output))
                cpu_used[path] = cpu.since()
                cell = rows_cell(BATCHED, path, in_flight, total_rows, seconds, latencies)
                cell.extra["CPU s"] = sum(cpu_used[path].values())
                results.cells.append(cell)

            for name in inputs:
                with_parts(
                    triton,
                    f"direct batched + the same {name} parts in S3",
                    f"direct-{name}/",
                    name == "Parquet",
                )
            with ExitStack() as proxies:
                first = proxies.enter_context(bare_proxy(triton, workdir / "proxy-1.log"))
                second = proxies.enter_context(bare_proxy(first, workdir / "proxy-2.log"))
                asyncio.run(direct_batched(second, rows[:2_000], in_flight, part_rows=2_000))
                for name in inputs:
                    with_parts(second, FLOOR.format(name), f"floor-{name}/", name == "Parquet")
            seconds, latencies = asyncio.run(naive(triton, rows[:naive_rows]))
            results.cells.append(
                rows_cell(ONE_ROW, "naive (Triton direct)", 1, naive_rows, seconds, latencies)
            )
            if big_rows:
                generating = time.perf_counter()
                big_uri = write_big_input(s3, big_rows, workdir)
                print(f"wrote {big_rows} rows of Parquet in {time.perf_counter() - generating:.1f} s")
                big = asyncio.run(run_job(api, big_uri, BIG_SHARD_ROWS))
                memory[f"after the {big_rows:,}-row job"] = worker_memory()
                if big.job.state != pb.JOB_STATE_SUCCEEDED or big.job.progress.rows_done != big_rows:
                    print(
                        f"the memory job ended {pb.JobState.Name(big.job.state)}: {big.job.failure_reason}",
                        file=sys.stderr,
                    )
                    return 1
                results.cells.append(
                    rows_cell(
                        BATCHED,
                        f"batch job, Parquet, {big_rows:,} rows in files of {BIG_FILE_ROWS:,}",
                        in_flight,
                        big_rows,
                        big.seconds,
                        [],
                    )
                )
            http.clear()
    finally:
        stack.down()
        shutil.rmtree(workdir, ignore_errors=True)

    results.cells.sort(key=lambda cell: (cell.group, cell.concurrency, cell.path != DIRECT))
    by_path = {cell.path: cell for cell in results.cells if cell.concurrency in (in_flight, 1)}
    direct_rate = next(c.throughput for c in results.cells if c.path == DIRECT and c.concurrency == in_flight)
    naive_rate = by_path["naive (Triton direct)"].throughput
    for name, run in runs.items():
        batch_rate = by_path[f"batch job, {name} (end to end)"].throughput
        writing_rate = by_path[f"direct batched + the same {name} parts in S3"].throughput
        results.aim(
            f"{name} batch job (worker -> router -> orchestrator -> Triton) >= 0.8x the fair baseline "
            f"(direct batched + the same {name} parts in S3)",
            f"{batch_rate / writing_rate:.3f}x",
            batch_rate >= 0.8 * writing_rate,
        )
        results.aim(
            f"{name} batch job >= 50x naive", f"{batch_rate / naive_rate:.2f}x", batch_rate >= 50 * naive_rate
        )
        floor_rate = by_path[FLOOR.format(name)].throughput
        results.notes.append(
            f"{name}: the floor (two bare proxies) reaches {floor_rate / writing_rate:.3f}x the fair "
            f"baseline; the batch job reaches {batch_rate / floor_rate:.3f}x its floor"
        )
        results.notes.append(
            f"{name} batch job / direct batched with answers dropped: {batch_rate / direct_rate:.3f}x"
        )
        results.notes.append(
            f"the {name} job's time: "
            + "; ".join(f"{phase} {secs:.2f} s" for phase, secs in run.phases.items())
        )
    if memory:
        peak = max((hwm for seen in memory.values() for hwm, _ in seen.values()), default=0.0)
        if big is not None:
            results.aim(
                f"batch worker peak RSS (VmHWM) < {RSS_BOUND_MB} MB through a {big_rows:,}-row Parquet job",
                f"{peak:.0f} MB",
                peak < RSS_BOUND_MB,
            )
        for when, seen in memory.items():
            results.notes.append(
                f"batch worker memory {when}: "
                + ", ".join(
                    f"pid {pid} peak {hwm:.0f} MB, now {rss:.0f} MB" for pid, (hwm, rss) in seen.items()
                )
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
