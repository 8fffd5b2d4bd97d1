"""Real-time inference: Triton direct against the mesh's hops, in one run, on one machine.

Workloads: `simple` (two INT32 [1,16] in, two out) and a 4 MiB FP32 tensor through an identity
model (4 MiB in, 4 MiB out; no demo model takes 4 MiB: `digits` stops at 256 rows = 64 KiB).
Each target runs each workload at each concurrency of the sweep (1, 4, 16, 64 requests in flight);
at one in flight, where the per-hop aims are read, the targets take turns in rounds and their
latencies are pooled (`benchkit.sweep_cells`), so a busy moment of the machine falls on all. The
report gives p50, p99, requests/s and payload MB/s (tensor bytes in + out), and each figure's
ratio against Triton direct.

Every mesh row is also read against its floor, measured in the same run: one bare Python
`grpc.aio` proxy forwarding bytes to Triton (`hopfloor.py`) for the orchestrator, two chained for
the router in front of the orchestrator. The columns `floor +ms` and `floor x` give how far the
row's p50 is above its floor's (difference and ratio), `floor rps x` its throughput against the
floor's; the per-hop aims are checked at the end.

A target is anything with `infer(workload)`: Triton's own API through tritonclient.grpc.aio, or
tensorway.inference.v1 at some address. The targets are Triton direct, the two floors, the
orchestrator and the router through both APIs (tensorway's and Triton's). Triton, the
orchestrator, the router and the proxies run as their own processes, started here and stopped at
the end. The router's routes come from a fake registry in
this process that sends one WatchRoutes snapshot and then stays quiet, so it costs nothing while
the bench runs.

    .venv/bin/python bench/realtime_bench.py [--quick] [--json PATH] [--seconds 5]
        [--concurrency 1 4 16 64] [--workload simple]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from benchkit import Results, add_common_arguments, cell_seconds, mode, prefixed, serve, sweep_cells
from hopfloor import bare_proxy
from tritonclient.grpc import InferInput, InferRequestedOutput

from tensorway.common.v1 import tensor_pb2
from tensorway.demo_models import build_repository
from tensorway.devstack import DevStackSettings, Stack
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc

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
def service(name: str, settings: dict[str, str], workdir: Path) -> Iterator[str]:
    """`tensorway serve NAME` without metrics, quiet, logging into the work dir."""
    environment = prefixed(name, {**settings, "METRICS_ENABLED": "false", "LOG_LEVEL": "WARNING"})
    with serve(name, environment, workdir / f"{name}.log") as address:
        yield address


class StaticRoutes(registry_grpc.RegistryServiceServicer):
    """WatchRoutes only: one snapshot of fixed routes, then nothing until the bench ends."""

    def __init__(self, routes: Sequence[registry_pb.Route]) -> None:
        self._routes = list(routes)
        self.stopped = threading.Event()

    def WatchRoutes(self, request: Any, context: Any) -> Iterator[registry_pb.WatchRoutesResponse]:
        yield registry_pb.WatchRoutesResponse(revision=1, snapshot=True, routes=self._routes)
        self.stopped.wait()


def routes_to(orchestrator_address: str, models: Sequence[str]) -> list[registry_pb.Route]:
    """Every model on the one orchestrator, with the signature the orchestrator reports."""
    routes = []
    with grpc.insecure_channel(orchestrator_address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for model in models:
            metadata = stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name=model), timeout=30)
            version = registry_pb.VersionRoute(
                version=metadata.versions[0],
                weight=100,
                pool="pools/bench",
                endpoints=[orchestrator_address],
                inputs=metadata.inputs,
                outputs=metadata.outputs,
                max_batch_size=metadata.max_batch_size,
                platform=metadata.platform,
            )
            routes.append(registry_pb.Route(model=model, versions=[version]))
    return routes


@contextmanager
def registry(routes: Sequence[registry_pb.Route]) -> Iterator[str]:
    """A registry that knows only `routes`, served from a thread of this process."""
    servicer = StaticRoutes(routes)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    registry_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        servicer.stopped.set()
        server.stop(grace=None)


ONE_HOP = "floor: 1 bare proxy"
TWO_HOPS = "floor: 2 bare proxies"
# Each mesh row's floor: the bare hops standing where its Python hops stand.
FLOORS = {
    "orchestrator": ONE_HOP,
    "orchestrator-triton": ONE_HOP,
    "router": TWO_HOPS,
    "router-triton": TWO_HOPS,
}


def targets(addresses: dict[str, str]) -> list[Target]:
    """Triton direct first: every ratio is against it."""
    return [
        TritonProtocolTarget("triton-direct", addresses["triton"]),
        TritonProtocolTarget(ONE_HOP, addresses["proxy"]),
        TritonProtocolTarget(TWO_HOPS, addresses["proxy2"]),
        InferenceServiceTarget("orchestrator", addresses["orchestrator"]),
        TritonProtocolTarget("orchestrator-triton", addresses["orchestrator"]),
        InferenceServiceTarget("router", addresses["router"]),
        TritonProtocolTarget("router-triton", addresses["router"]),
    ]


def read_against_floors(results: Results) -> None:
    """Each mesh row's p50 and throughput against its floor's, and the per-hop aims."""
    cells = {(cell.group, cell.path, cell.concurrency): cell for cell in results.cells}
    for cell in results.cells:
        floor = cells.get((cell.group, FLOORS.get(cell.path, ""), cell.concurrency))
        if floor is None or not cell.p50_ms or not floor.p50_ms:
            continue
        cell.extra["floor +ms"] = cell.p50_ms - floor.p50_ms
        cell.extra["floor x"] = cell.p50_ms / floor.p50_ms
        cell.extra["floor rps x"] = cell.throughput / floor.throughput if floor.throughput else None
    for path, within in (("router", 0.2), ("router-triton", 0.2), ("orchestrator", 0.1)):
        cell = cells.get(("simple", path, 1))
        if cell is not None and "floor +ms" in cell.extra:
            above = cell.extra["floor +ms"]
            results.aim(
                f"{path} p50 within {within} ms of {FLOORS[path]} (simple, 1 in flight)",
                f"{above:+.3f} ms ({cell.p50_ms:.3f} ms)",
                above <= within,
            )
    direct = cells.get(("fp32-4MiB", "triton-direct", 1))
    for path in ("router", "router-triton"):
        routed = cells.get(("fp32-4MiB", path, 1))
        if direct is not None and routed is not None and direct.throughput:
            share = routed.throughput / direct.throughput
            results.aim(
                f"4 MiB through the {path}: at least 0.7x direct bandwidth (1 in flight)",
                f"{share:.2f}x",
                share >= 0.7,
            )


async def run(
    addresses: dict[str, str],
    seconds: float,
    concurrencies: Sequence[int],
    names: Sequence[str],
    results: Results,
) -> None:
    chosen = targets(addresses)
    triton_client = triton_aio.InferenceServerClient(addresses["triton"])
    results.versions["Triton"] = (await triton_client.get_server_metadata()).version
    await triton_client.close()
    try:
        for workload in (workload for workload in workloads() if workload.name in names):
            calls = {
                target.name: lambda target=target, workload=workload: target.infer(workload)
                for target in chosen
            }
            for concurrency in concurrencies:
                for cell in await sweep_cells(workload.name, calls, concurrency, seconds):
                    cell.extra["MB/s"] = cell.throughput * workload.payload_bytes / 1e6
                    results.cells.append(cell)
        read_against_floors(results)
    finally:
        for target in chosen:
            await target.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--workload", nargs="+", default=[w.name for w in workloads()], help="workloads to run (all)"
    )
    args = parser.parse_args()
    seconds = cell_seconds(args)
    results = Results(
        benchmark="realtime",
        title="Real-time inference: Triton direct, the orchestrator and the router",
        mode=mode(args),
        baseline="triton-direct",
        throughput_unit="req/s",
        settings={"seconds per cell": seconds, "concurrency": args.concurrency, "workloads": args.workload},
        notes=[
            "The floors are called as Triton's users call Triton (tritonclient.grpc.aio), like the"
            " *-triton rows; the orchestrator and router rows use tensorway's generated stubs, whose"
            " client side costs less for large tensors, so at 4 MiB the like-for-like reading is"
            " router-triton against its floor."
        ],
    )
    workdir = Path(tempfile.mkdtemp(prefix="tensorway-bench-"))
    try:
        with ExitStack() as running:
            triton_address = running.enter_context(triton(workdir))
            orchestrator_address = running.enter_context(
                service("orchestrator", {"TRITONS": json.dumps([triton_address])}, workdir)
            )
            models = [workload.model for workload in workloads()]
            registry_address = running.enter_context(registry(routes_to(orchestrator_address, models)))
            router_address = running.enter_context(
                service("router", {"REGISTRY_ADDRESS": registry_address}, workdir)
            )
            proxy_address = running.enter_context(bare_proxy(triton_address, workdir / "proxy.log"))
            proxy2_address = running.enter_context(bare_proxy(proxy_address, workdir / "proxy2.log"))
            addresses = {
                "triton": triton_address,
                "proxy": proxy_address,
                "proxy2": proxy2_address,
                "orchestrator": orchestrator_address,
                "router": router_address,
            }
            print(f"{os.cpu_count()} CPUs; " + "; ".join(f"{k} {v}" for k, v in addresses.items()))
            asyncio.run(run(addresses, seconds, args.concurrency, args.workload, results))
        results.write(args.json)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
