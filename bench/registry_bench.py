"""ResolveModel from one client process: cached, through Redis, and uncached, beside a direct
psycopg query of the same deployment row, in one run.

    python bench/registry_bench.py [--seconds 3]

It starts its own PostgreSQL and Redis through tensorway.devstack, and each registry the way
production does (`tensorway serve registry`, one mode at a time, so this client process is the
only other thing running). Latency is one call at a time, as a client sees it; calls/s keeps
`--in-flight` calls going on one channel. "server p50/p99" is the registry's own
handling-time histogram (ResolveModel, interceptor to status), interpolated the way
Prometheus' histogram_quantile does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool

from tensorway.common.v1 import tensor_pb2
from tensorway.devstack import DevStackSettings, Stack, default_components
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.registry.v1 import registry_service_pb2_grpc as pb_grpc

MODEL = "bench-digits"
ROW_QUERY = "SELECT * FROM deployments WHERE model = %s AND name = %s"


@dataclass
class Figures:
    p50: float
    p99: float
    calls_per_second: float
    server_p50: float | None = None
    server_p99: float | None = None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def measure(call: Callable[[], Awaitable[object]], seconds: float, in_flight: int) -> Figures:
    for _ in range(200):  # warm up connections, caches and prepared statements
        await call()
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    done = 0

    async def worker(until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(started + seconds) for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    return Figures(
        p50=latencies[len(latencies) // 2],
        p99=latencies[int(len(latencies) * 0.99)],
        calls_per_second=done / elapsed,
    )


def histogram_quantiles(metrics_url: str, method: str, quantiles: tuple[float, ...]) -> list[float]:
    """Quantiles of the server's handling-time histogram for one method, interpolated within buckets."""
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
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    results = []
    for quantile in quantiles:
        rank = quantile * total
        lower_bound, lower_count = 0.0, 0.0
        for bound in bounds:
            if buckets[bound] >= rank:
                share = (rank - lower_count) / max(buckets[bound] - lower_count, 1e-9)
                results.append(
                    lower_bound + (bound - lower_bound) * share if bound != float("inf") else lower_bound
                )
                break
            lower_bound, lower_count = bound, buckets[bound]
    return results


class RegistryProcess:
    """`tensorway serve registry` in a child process."""

    def __init__(self, postgres_url: str, redis_url: str, resolve_from: str, log: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "TENSORWAY_REGISTRY_POSTGRES_URL": postgres_url,
            "TENSORWAY_REGISTRY_REDIS_URL": redis_url,
            "TENSORWAY_REGISTRY_RESOLVE_FROM": resolve_from,
            "TENSORWAY_REGISTRY_METRICS_PORT": str(self.metrics_port),
            "TENSORWAY_REGISTRY_LOG_LEVEL": "WARNING",
        }
        tensorway = Path(sys.executable).parent / "tensorway"
        self.log = log
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                [str(tensorway), "serve", "registry", "--port", str(self.port)],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.address = f"127.0.0.1:{self.port}"

    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def seed(stub: pb_grpc.RegistryServiceStub) -> None:
    """One model with two versions on a pool of three, split 90/10 with a canary alias."""
    try:
        await stub.GetModel(pb.GetModelRequest(name=f"models/{MODEL}"))
        return
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
    await stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=f"models/{MODEL}")))
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
            )
        )
    endpoints = [f"10.0.0.{i}:8001" for i in range(1, 4)]
    await stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name="pools/bench", endpoints=endpoints)))
    await stub.CreateDeployment(
        pb.CreateDeploymentRequest(
            parent=f"models/{MODEL}",
            deployment_id="main",
            deployment=pb.Deployment(
                pool="pools/bench",
                traffic=[pb.TrafficSplit(version="1", weight=90), pb.TrafficSplit(version="2", weight=10)],
                aliases={"canary": "2"},
            ),
        )
    )


async def bench_registry(
    postgres_url: str, redis_url: str, mode: str, seconds: float, in_flight: int, logs: Path
) -> dict[str, Figures]:
    """ResolveModel against a registry resolving from `mode`; for the cached registry also the
    gRPC health check, the cheapest call the same server answers (the floor of any RPC)."""
    registry = RegistryProcess(postgres_url, redis_url, mode, logs / f"registry-{mode}.log")
    try:
        async with grpc.aio.insecure_channel(registry.address) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=30)
            except TimeoutError:
                tail = registry.log.read_text(errors="replace")[-2000:]
                raise SystemExit(f"the registry did not start:\n{tail}") from None
            stub = pb_grpc.RegistryServiceStub(channel)
            await seed(stub)
            request = pb.ResolveModelRequest(name=f"models/{MODEL}")
            assert (await stub.ResolveModel(request)).version == "1"
            figures = {mode: await measure(lambda: stub.ResolveModel(request), seconds, in_flight)}
            if mode == "memory":
                health = health_pb2_grpc.HealthStub(channel)
                check = health_pb2.HealthCheckRequest()
                figures["health"] = await measure(lambda: health.Check(check), seconds, in_flight)
        figures[mode].server_p50, figures[mode].server_p99 = histogram_quantiles(
            registry.metrics_url(), "ResolveModel", (0.5, 0.99)
        )
        return figures
    finally:
        registry.stop()


async def bench_direct_query(postgres_url: str, seconds: float, in_flight: int) -> Figures:
    async with AsyncConnectionPool(postgres_url, min_size=in_flight, max_size=in_flight, open=False) as pool:
        await pool.wait()

        async def query() -> object:
            async with pool.connection() as connection:
                cursor = await connection.execute(ROW_QUERY, (MODEL, "main"))
                return await cursor.fetchone()

        return await measure(query, seconds, in_flight)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.3f}"


async def run(postgres_url: str, redis_url: str, seconds: float, in_flight: int, logs: Path) -> None:
    figures: dict[str, Figures] = {}
    for mode in ("memory", "redis", "postgres"):
        figures |= await bench_registry(postgres_url, redis_url, mode, seconds, in_flight, logs)
    figures["direct"] = await bench_direct_query(postgres_url, seconds, in_flight)
    rows = {
        "ResolveModel cached (in-memory table)": figures["memory"],
        "ResolveModel through Redis": figures["redis"],
        "ResolveModel uncached (PostgreSQL)": figures["postgres"],
        "direct psycopg query, same row": figures["direct"],
        "gRPC health check, same server (floor)": figures["health"],
    }
    load = os.getloadavg()[0]
    print(
        f"\none client process; {os.cpu_count()} CPUs, load average {load:.1f};"
        f" calls/s with {in_flight} calls in flight"
    )
    print(f"{'':40} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>9} {'server p50':>11} {'server p99':>11}")
    for name, f in rows.items():
        print(
            f"{name:40} {ms(f.p50):>8} {ms(f.p99):>8} {f.calls_per_second:>9,.0f}"
            f" {ms(f.server_p50):>11} {ms(f.server_p99):>11}"
        )
    cached, uncached, direct, health = (
        figures["memory"],
        figures["postgres"],
        figures["direct"],
        figures["health"],
    )
    print("\nratios")
    for label, ratio in (
        ("uncached / cached, p50 latency", uncached.p50 / cached.p50),
        ("cached / uncached, calls/s", cached.calls_per_second / uncached.calls_per_second),
        ("cached resolve / direct query, p50 latency", cached.p50 / direct.p50),
        ("cached resolve / direct query, calls/s", cached.calls_per_second / direct.calls_per_second),
        ("cached resolve / health check, calls/s", cached.calls_per_second / health.calls_per_second),
    ):
        print(f"  {label:44} {ratio:6.2f}x")
    server_p50_met = cached.server_p50 is not None and cached.server_p50 < 0.0003
    print(
        f"\naim: cached server p50 < 0.3 ms: {'met' if server_p50_met else 'not met'};"
        f" > 5,000 resolves/s from one process: {'met' if cached.calls_per_second > 5000 else 'not met'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="length of each latency and each throughput run"
    )
    parser.add_argument("--in-flight", type=int, default=32, help="concurrent calls for the calls/s runs")
    args = parser.parse_args()
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
        asyncio.run(run(postgres_url, redis_url, args.seconds, args.in_flight, state_dir))
    finally:
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
