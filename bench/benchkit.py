"""What the benchmarks in this folder share: the concurrency sweep, the percentile math, the
results file that `tensorway bench` renders into docs/benchmarks.md, the command-line options,
and starting `tensorway serve` processes.

A results file is one JSON object:

    {"benchmark": "realtime", "title": "...", "mode": "full" | "quick",
     "started": ISO time, "finished": ISO time, "settings": {...}, "versions": {...},
     "baseline": the path every ratio is against, "throughput_unit": "req/s" | "rows/s" | ...,
     "cells": [{"group": model/payload, "path": what was called, "concurrency": N,
                "seconds": measured time, "requests": N or null,
                "p50_ms": ..., "p99_ms": ..., "throughput": ..., "extra": {"MB/s": ...}}],
     "aims": [{"aim": "...", "measured": "...", "met": true}], "notes": ["..."]}

Latency fields are null for a cell that has no per-request latencies (a whole batch job).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorway.bench_results import BenchResults

# Requests in flight for each cell of the latency-against-concurrency curves.
SWEEP = (1, 4, 16, 64)
TENSORWAY = str(Path(sys.executable).with_name("tensorway"))


def percentile_ms(latencies: Sequence[float], q: float) -> float | None:
    """The q-th percentile of latencies in seconds, in ms, linearly interpolated (numpy's default)."""
    return float(np.percentile(latencies, q)) * 1000 if latencies else None


@dataclass
class Cell:
    """One measured cell: a path of one group at one concurrency."""

    group: str
    path: str
    concurrency: int
    seconds: float
    throughput: float
    requests: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    extra: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def from_latencies(
        cls, group: str, path: str, concurrency: int, seconds: float, latencies: Sequence[float]
    ) -> Cell:
        """A cell whose throughput is requests per second."""
        return cls(
            group=group,
            path=path,
            concurrency=concurrency,
            seconds=seconds,
            throughput=len(latencies) / seconds,
            requests=len(latencies),
            p50_ms=percentile_ms(latencies, 50),
            p99_ms=percentile_ms(latencies, 99),
        )


async def keep_in_flight(
    call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> tuple[list[float], float]:
    """Keep `concurrency` calls going for `seconds`; every call's latency and the time taken.

    Calls still running at the deadline finish and count, so the time is measured to the last one.
    """
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def sweep_cell(
    group: str, path: str, call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> Cell:
    """A warmed-up cell: a short run at the same concurrency first opens connections and fills caches."""
    await keep_in_flight(call, concurrency, min(0.5, seconds))
    latencies, elapsed = await keep_in_flight(call, concurrency, seconds)
    return Cell.from_latencies(group, path, concurrency, elapsed, latencies)


# Turns each target takes in a cell at one request in flight (see `sweep_cells`).
ROUNDS_AT_ONE_IN_FLIGHT = 5


async def sweep_cells(
    group: str, calls: Mapping[str, Callable[[], Awaitable[object]]], concurrency: int, seconds: float
) -> list[Cell]:
    """A warmed-up cell for each path of `calls`, `seconds` each. At one request in flight, where
    the aims read differences of a tenth of a millisecond, the paths take turns, in
    ROUNDS_AT_ONE_IN_FLIGHT rounds of a share of `seconds` each, and each path's latencies are
    pooled: a busy moment of the shared machine then falls on every path alike instead of on
    whichever ran through it. With more in flight each path runs its `seconds` at once, since a
    turn would end by waiting for the slowest calls in flight to drain."""
    if concurrency != 1:
        return [await sweep_cell(group, path, call, concurrency, seconds) for path, call in calls.items()]
    for call in calls.values():
        await keep_in_flight(call, concurrency, min(0.5, seconds))
    latencies: dict[str, list[float]] = {path: [] for path in calls}
    elapsed = dict.fromkeys(calls, 0.0)
    for _ in range(ROUNDS_AT_ONE_IN_FLIGHT):
        for path, call in calls.items():
            taken, spent = await keep_in_flight(call, concurrency, seconds / ROUNDS_AT_ONE_IN_FLIGHT)
            latencies[path].extend(taken)
            elapsed[path] += spent
    return [Cell.from_latencies(group, path, concurrency, elapsed[path], latencies[path]) for path in calls]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class Results:
    """Everything one benchmark run measured, as the report reads it."""

    benchmark: str
    title: str
    mode: str
    baseline: str
    throughput_unit: str
    settings: dict[str, object]
    started: str = field(default_factory=now)
    finished: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    aims: list[dict[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def aim(self, aim: str, measured: str, met: bool) -> None:
        self.aims.append({"aim": aim, "measured": measured, "met": met})

    def print_table(self) -> None:
        """The human-readable table: every cell, and its ratios against the baseline as the report
        computes them."""
        as_reported = BenchResults.from_json(asdict(self))
        extras = list(dict.fromkeys(name for cell in self.cells for name in cell.extra))
        unit = self.throughput_unit
        print(f"\n{self.title}  (ratios: against {self.baseline}, same group and concurrency)")
        print(
            f"{'group':<26} {'path':<40} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {unit:>10}"
            + "".join(f" {name:>10}" for name in extras)
            + f"   {'p50 x':>6} {'p99 x':>6} {unit + ' x':>9}"
        )
        for cell in as_reported.cells:
            base = as_reported.baseline_of(cell)
            print(
                f"{cell.group:<26} {cell.path:<40} {cell.concurrency:>4} {number(cell.p50_ms, 3):>8}"
                f" {number(cell.p99_ms, 3):>8} {number(cell.throughput, 1):>10}"
                + "".join(f" {number(cell.extra.get(name), 3):>10}" for name in extras)
                + f"   {ratio(cell.p50_ms, base and base.p50_ms):>6}"
                f" {ratio(cell.p99_ms, base and base.p99_ms):>6}"
                f" {ratio(cell.throughput, base and base.throughput):>9}"
            )
        for aim in self.aims:
            print(f"aim: {aim['aim']}: {aim['measured']}: {'met' if aim['met'] else 'MISSED'}")
        for note in self.notes:
            print(f"note: {note}")

    def write(self, path: Path | None) -> None:
        """Print the table, and with a path also write the results file the report renders."""
        self.finished = now()
        self.print_table()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(self), indent=1) + "\n")


def number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}"


def add_common_arguments(parser: argparse.ArgumentParser, *, seconds: bool = True) -> None:
    """--quick, --json, --concurrency and, for benchmarks whose cells are timed, --seconds."""
    parser.add_argument(
        "--quick", action="store_true", help="CI-size run: short cells and small inputs, to prove it runs"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=list(SWEEP),
        help=f"requests in flight, one cell each (default {' '.join(map(str, SWEEP))})",
    )
    if seconds:
        parser.add_argument(
            "--seconds", type=float, help="measured time per cell (default: full 5, quick 0.5)"
        )


def mode(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "full"


def cell_seconds(args: argparse.Namespace) -> float:
    if args.seconds is not None:
        return float(args.seconds)
    return 0.5 if args.quick else 5.0


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


def stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Terminate `process`, and kill it if it has not exited `grace` seconds later."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def serve(service: str, environment: Mapping[str, str], log: Path) -> Iterator[str]:
    """`tensorway serve SERVICE` as its own process until the block ends; yields its gRPC address.

    `environment` is added to this process's, so it names full variables (TENSORWAY_<SERVICE>_...).
    """
    port = free_port()
    with log.open("ab") as output:
        process = subprocess.Popen(
            [TENSORWAY, "serve", service, "--port", str(port)],
            env={**os.environ, **environment},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        address = f"127.0.0.1:{port}"
        try:
            wait_serving(address, process)
        except RuntimeError:
            raise RuntimeError(
                f"{service} did not start:\n{log.read_text(errors='replace')[-2000:]}"
            ) from None
        yield address
    finally:
        stop(process, grace=30)


def prefixed(service: str, settings: Mapping[str, str]) -> dict[str, str]:
    """Settings named without their prefix, as `tensorway serve SERVICE` reads them."""
    prefix = f"TENSORWAY_{service.upper().replace('-', '_')}_"
    return {prefix + key: value for key, value in settings.items()}
