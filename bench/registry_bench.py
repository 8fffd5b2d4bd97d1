"""ResolveModel from one client process: cached, through Redis, and uncached, beside a direct
psycopg query of the same deployment row, in one run.

    .venv/bin/python bench/registry_bench.py [--quick] [--json PATH] [--seconds 5]
        [--concurrency 1 4 16 64]

It starts its own PostgreSQL and Redis through tensorway.devstack, and each registry the way
production does (`tensorway serve registry`, one mode at a time, so this client process is the
only other thing running). Each path runs at each concurrency of the sweep, that many calls in
flight on one channel, as a client sees them. "server p50/p99" is the registry's own
handling-time histogram (ResolveModel, interceptor to status) over that cell alone,
interpolated the way Prometheus' histogram_quantile does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
from benchkit import (
    Results,
    add_common_arguments,
    cell_seconds,
    free_port,
    mode,
    prefixed,
    serve,
    sweep_cell,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool

from tensorway.common.v1 import tensor_pb2
from tensorway.devstack import DevStackSettings, Stack, default_components
from tensorway.registry.access import admin_metadata
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.registry.v1 import registry_service_pb2_grpc as pb_grpc

MODEL = "bench-digits"
ADMIN = admin_metadata("bench")  # the registry's writes need an admin's identity
ROW_QUERY = "SELECT * FROM deployments WHERE model = %s AND name = %s"
GROUP = "ResolveModel"
PATHS = {
    "memory": "ResolveModel cached (in-memory table)",
    "redis": "ResolveModel through Redis",
    "postgres": "ResolveModel uncached (PostgreSQL)",
    "direct": "direct psycopg query, same row",
    "health": "gRPC health check, same server (floor)",
}
SERVER_P50, SERVER_P99 = "server p50 ms", "server p99 ms"


def handling_buckets(metrics_url: str, method: str) -> dict[float, float]:
    """The server's cumulative handling-time histogram for one method: upper bound → count."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "tensorway_grpc_server_handling_seconds_bucket"
                and sample.labels.get("grpc_method") == method
                and sample.labels.get("grpc_code") == "OK"
            ):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def histogram_quantile_ms(
    before: dict[float, float], after: dict[float, float], quantile: float
) -> float | None:
    """A quantile of the calls between two snapshots, interpolated within buckets."""
    buckets = {bound: count - before.get(bound, 0.0) for bound, count in after.items()}
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = quantile * buckets[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower_bound * 1000
            share = (rank - lower_count) / max(buckets[bound] - lower_count, 1e-9)
            return (lower_bound + (bound - lower_bound) * share) * 1000
        lower_bound, lower_count = bound, buckets[bound]
    return None


@contextmanager
def registry_process(
    postgres_url: str, redis_url: str, resolve_from: str, logs: Path
) -> Iterator[tuple[str, str]]:
    """`tensorway serve registry` resolving from `resolve_from`; yields its address and metrics URL."""
    metrics_port = free_port()
    environment = prefixed(
        "registry",
        {
            "POSTGRES_URL": postgres_url,
            "REDIS_URL": redis_url,
            "RESOLVE_FROM": resolve_from,
            "METRICS_PORT": str(metrics_port),
            "LOG_LEVEL": "WARNING",
        },
    )
    with serve("registry", environment, logs / f"registry-{resolve_from}.log") as address:
        yield address, f"http://127.0.0.1:{metrics_port}/metrics"


async def seed(stub: pb_grpc.RegistryServiceStub) -> None:
    """One model with two versions on a pool of three, split 90/10 with a canary alias."""
    try:
        await stub.GetModel(pb.GetModelRequest(name=f"models/{MODEL}"))
        return
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
    await stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=f"models/{MODEL}")), metadata=ADMIN)
    for _ in range(2):
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=f"models/{MODEL}",
                model_version=pb.ModelVersion(
                    platform="onnxruntime_onnx",
                    inputs=[tensor_pb2.TensorSpec(name="input", datatype="FP32", shape=[64])],
                    outputs=[
                        tensor_pb2.TensorSpec(name="label", datatype="INT64", shape=[1]),
                        tensor_pb2.TensorSpec(name="probabilities", datatype="FP32", shape=[10]),
                    ],
                    max_batch_size=256,
                    artifact_uri=f"s3://models/{MODEL}/1",
                ),
            ),
            metadata=ADMIN,
        )
    endpoints = [f"127.0.0.{i}:8001" for i in range(1, 4)]  # resolved, never called
    await stub.CreatePool(
        pb.CreatePoolRequest(pool=pb.Pool(name="pools/bench", endpoints=endpoints)), metadata=ADMIN
    )
    await stub.CreateDeployment(
        pb.CreateDeploymentRequest(
            parent=f"models/{MODEL}",
            deployment_id="main",
            deployment=pb.Deployment(
                pool="pools/bench",
                traffic=[pb.TrafficSplit(version="1", weight=90), pb.TrafficSplit(version="2", weight=10)],
                aliases={"canary": "2"},
            ),
        ),
        metadata=ADMIN,
    )


async def bench_registry(
    postgres_url: str,
    redis_url: str,
    mode: str,
    seconds: float,
    concurrencies: Sequence[int],
    logs: Path,
    results: Results,
) -> None:
    """ResolveModel against a registry resolving from `mode`; for the cached registry also the
    gRPC health check, the cheapest call the same server answers (the floor of any RPC)."""
    with registry_process(postgres_url, redis_url, mode, logs) as (address, metrics_url):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            await seed(stub)
            request = pb.ResolveModelRequest(name=f"models/{MODEL}")
            assert (await stub.ResolveModel(request)).version == "1"
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest()
            for concurrency in concurrencies:
                before = handling_buckets(metrics_url, "ResolveModel")
                cell = await sweep_cell(
                    GROUP, PATHS[mode], lambda: stub.ResolveModel(request), concurrency, seconds
                )
                after = handling_buckets(metrics_url, "ResolveModel")
                cell.extra[SERVER_P50] = histogram_quantile_ms(before, after, 0.5)
                cell.extra[SERVER_P99] = histogram_quantile_ms(before, after, 0.99)
                results.cells.append(cell)
                if mode == "memory":
                    call: Callable[[], Awaitable[object]] = lambda: health.Check(check)  # noqa: E731
                    results.cells.append(await sweep_cell(GROUP, PATHS["health"], call, concurrency, seconds))


async def bench_direct_query(
    postgres_url: str, seconds: float, concurrencies: Sequence[int], results: Results
) -> None:
    size = max(concurrencies)
    async with AsyncConnectionPool(postgres_url, min_size=size, max_size=size, open=False) as pool:
        await pool.wait()

        async def query() -> object:
            async with pool.connection() as connection:
                cursor = await connection.execute(ROW_QUERY, (MODEL, "main"))
                return await cursor.fetchone()

        for concurrency in concurrencies:
            results.cells.append(await sweep_cell(GROUP, PATHS["direct"], query, concurrency, seconds))


async def run(
    postgres_url: str,
    redis_url: str,
    seconds: float,
    concurrencies: Sequence[int],
    logs: Path,
    results: Results,
) -> None:
    for resolve_from in ("memory", "redis", "postgres"):
        await bench_registry(postgres_url, redis_url, resolve_from, seconds, concurrencies, logs, results)
    await bench_direct_query(postgres_url, seconds, concurrencies, results)
    results.cells.sort(key=lambda cell: (list(PATHS.values()).index(cell.path), cell.concurrency))
    cached = [cell for cell in results.cells if cell.path == PATHS["memory"]]
    lowest = min(cached, key=lambda cell: cell.concurrency)
    server_p50 = lowest.extra[SERVER_P50]
    results.aim(
        "cached ResolveModel, server p50 < 0.3 ms",
        f"{'-' if server_p50 is None else f'{server_p50:.3f}'} ms at {lowest.concurrency} in flight",
        server_p50 is not None and server_p50 < 0.3,
    )
    busiest = max(cached, key=lambda cell: cell.throughput)
    results.aim(
        "> 5,000 cached resolves/s from one client process",
        f"{busiest.throughput:,.0f}/s at {busiest.concurrency} in flight",
        busiest.throughput > 5000,
    )
    results.notes.append(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the end")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    args = parser.parse_args()
    seconds = cell_seconds(args)
    results = Results(
        benchmark="registry",
        title="Registry: ResolveModel cached, through Redis and uncached, beside a direct query",
        mode=mode(args),
        baseline=PATHS["direct"],
        throughput_unit="calls/s",
        settings={"seconds per cell": seconds, "concurrency": args.concurrency},
    )
    # PostgreSQL runs as an unprivileged user when this runs as root: its directory must be reachable.
    state_dir = Path(tempfile.mkdtemp(prefix="tensorway-registry-bench-"))
    state_dir.chmod(0o755)
    stack = Stack(
        DevStackSettings(state_dir=state_dir).without_pinned_ports(),
        state_dir=state_dir,
        components=[c for c in default_components() if c.name in ("postgres", "redis")],
    )
    try:
        print("starting PostgreSQL and Redis ...", flush=True)
        endpoints = stack.up().endpoints()
        postgres_url, redis_url = endpoints["postgres"].url, endpoints["redis"].url
        assert postgres_url is not None
        assert redis_url is not None
        asyncio.run(run(postgres_url, redis_url, seconds, args.concurrency, state_dir, results))
    finally:
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
