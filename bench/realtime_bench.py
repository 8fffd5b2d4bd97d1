"""Real-time inference: Triton direct against the mesh's hops, in one run, on one machine.

Workloads: `simple` (two INT32 [1,16] in, two out) and a 4 MiB FP32 tensor through an identity
model (4 MiB in, 4 MiB out; no demo model takes 4 MiB: `digits` stops at 256 rows = 64 KiB).
Each target runs each workload at concurrency 1 and 32; the report gives p50, p99, requests/s
and payload MB/s (tensor bytes in + out), and each figure's ratio against Triton direct.

A target is anything with `infer(workload)`: Triton's own API through tritonclient.grpc.aio, or
tensorway.inference.v1 at some address. More hops (router, Envoy) are more entries in
`targets()`. Triton and the orchestrator run as their own processes, started here and stopped
at the end.

    .venv/bin/python bench/realtime_bench.py [--seconds 4] [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import InferInput, InferRequestedOutput

from tensorway.common.v1 import tensor_pb2
from tensorway.demo_models import build_repository
from tensorway.devstack import DevStackSettings, Stack
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc

IDENTITY_MODEL = "identity_fp32"
IDENTITY_CONFIG = f"""name: "{IDENTITY_MODEL}"
backend: "python"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""
IDENTITY_SOURCE = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]
            )
            for r in requests
        ]
"""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
DATATYPES = {np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}


@dataclass(frozen=True)
class Workload:
    """One kind of request: the model, its inputs, and the outputs asked for."""

    name: str
    model: str
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: tuple[str, ...]
    output_bytes: int

    @property
    def payload_bytes(self) -> int:
        return sum(array.nbytes for array in self.inputs.values()) + self.output_bytes


def workloads() -> list[Workload]:
    operand = np.arange(16, dtype=np.int32).reshape(1, 16)
    big = np.random.default_rng(0).random(1024 * 1024, dtype=np.float32)  # 4 MiB
    return [
        Workload("simple", "simple", {"INPUT0": operand, "INPUT1": operand}, ("OUTPUT0", "OUTPUT1"), 128),
        Workload("fp32-4MiB", IDENTITY_MODEL, {"INPUT0": big}, ("OUTPUT0",), big.nbytes),
    ]


class Target(Protocol):
    name: str

    async def infer(self, workload: Workload) -> None: ...

    async def close(self) -> None: ...


class TritonProtocolTarget:
    """Triton's GRPCInferenceService through tritonclient.grpc.aio, as Triton's own users call it."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self._client = triton_aio.InferenceServerClient(address)
        self._prepared: dict[str, tuple[list[InferInput], list[InferRequestedOutput]]] = {}

    async def infer(self, workload: Workload) -> None:
        if workload.name not in self._prepared:
            inputs = []
            for input_name, array in workload.inputs.items():
                tensor = InferInput(input_name, list(array.shape), DATATYPES[array.dtype])
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            self._prepared[workload.name] = (inputs, [InferRequestedOutput(n) for n in workload.outputs])
        inputs, outputs = self._prepared[workload.name]
        result = await self._client.infer(workload.model, inputs, outputs=outputs)
        assert result.as_numpy(workload.outputs[0]) is not None

    async def close(self) -> None:
        await self._client.close()


class InferenceServiceTarget:
    """tensorway.inference.v1.InferenceService (orchestrator or router) with raw tensors."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._prepared: dict[str, pb.InferRequest] = {}

    async def infer(self, workload: Workload) -> None:
        if workload.name not in self._prepared:
            self._prepared[workload.name] = pb.InferRequest(
                model_name=workload.model,
                inputs=[
                    tensor_pb2.Tensor(
                        name=name, datatype=DATATYPES[a.dtype], shape=a.shape, raw_contents=a.tobytes()
                    )
                    for name, a in workload.inputs.items()
                ],
                outputs=[pb.RequestedOutput(name=name, binary=True) for name in workload.outputs],
            )
        response = await self._stub.Infer(self._prepared[workload.name])
        assert response.outputs[0].raw_contents

    async def close(self) -> None:
        await self._channel.close()


@dataclass
class Measurement:
    target: str
    workload: Workload
    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies, 99)) * 1000

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def megabytes_per_second(self) -> float:
        return self.requests_per_second * self.workload.payload_bytes / 1e6


async def measure(target: Target, workload: Workload, concurrency: int, seconds: float) -> Measurement:
    """Keep `concurrency` requests going for `seconds` after a warm-up; every latency is kept."""
    for _ in range(max(concurrency, 20)):
        await target.infer(workload)
    result = Measurement(target.name, workload, concurrency)
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            await target.infer(workload)
            result.latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result


def report(results: Sequence[Measurement]) -> None:
    header = (
        f"{'workload':<10} {'conc':>4}  {'target':<14} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'MB/s':>8}"
    )
    ratios = f"{'p50 x':>6} {'+p50 ms':>8} {'req/s x':>8} {'MB/s x':>7}"
    print(f"{header}   {ratios}")
    direct = {(r.workload.name, r.concurrency): r for r in results if r.target == "triton-direct"}
    for r in results:
        base = direct[(r.workload.name, r.concurrency)]
        print(
            f"{r.workload.name:<10} {r.concurrency:>4}  {r.target:<14} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} "
            f"{r.requests_per_second:>9.1f} {r.megabytes_per_second:>8.1f}   "
            f"{r.p50_ms / base.p50_ms:>6.2f} {r.p50_ms - base.p50_ms:>8.3f} "
            f"{r.requests_per_second / base.requests_per_second:>8.2f} "
            f"{r.megabytes_per_second / base.megabytes_per_second:>7.2f}"
        )


@contextmanager
def triton(workdir: Path) -> Iterator[str]:
    """Triton serving the demo models and the identity model, from the local stack's launcher."""
    repository = workdir / "models"
    build_repository(repository)
    (repository / IDENTITY_MODEL / "1").mkdir(parents=True, exist_ok=True)
    (repository / IDENTITY_MODEL / "config.pbtxt").write_text(IDENTITY_CONFIG)
    (repository / IDENTITY_MODEL / "1" / "model.py").write_text(IDENTITY_SOURCE)
    settings = DevStackSettings(state_dir=workdir / "stack", triton_model_repository=repository)
    stack = Stack(settings.without_pinned_ports(), die_with_parent=True)
    try:
        yield stack.ensure(["triton"]).endpoints()["triton_grpc"].address
    finally:
        stack.down()


@contextmanager
def orchestrator(triton_address: str, workdir: Path) -> Iterator[str]:
    """`tensorway serve orchestrator` as its own process, in front of `triton_address`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "TENSORWAY_ORCHESTRATOR_TRITONS": json.dumps([triton_address]),
        "TENSORWAY_ORCHESTRATOR_METRICS_ENABLED": "false",
        "TENSORWAY_ORCHESTRATOR_LOG_LEVEL": "WARNING",
    }
    command = [str(Path(sys.executable).with_name("tensorway")), "serve", "orchestrator", "--port", str(port)]
    with open(workdir / "orchestrator.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, process)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_serving(address: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
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


def targets(addresses: dict[str, str]) -> list[Target]:
    """Triton direct first: every ratio is against it."""
    return [
        TritonProtocolTarget("triton-direct", addresses["triton"]),
        InferenceServiceTarget("orchestrator", addresses["orchestrator"]),
    ]


async def run(addresses: dict[str, str], seconds: float, concurrencies: Sequence[int]) -> list[Measurement]:
    chosen = targets(addresses)
    results = []
    try:
        for workload in workloads():
            for concurrency in concurrencies:
                for target in chosen:
                    results.append(await measure(target, workload, concurrency, seconds))
    finally:
        for target in chosen:
            await target.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tensorway-bench-"))
    try:
        with triton(workdir) as triton_address, orchestrator(triton_address, workdir) as orchestrator_address:
            addresses = {"triton": triton_address, "orchestrator": orchestrator_address}
            print(f"{os.cpu_count()} CPUs; Triton {triton_address}; orchestrator {orchestrator_address}")
            results = asyncio.run(run(addresses, args.seconds, args.concurrency))
        report(results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
