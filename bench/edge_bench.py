"""The edge's cost: the `simple` model through the router directly and through Envoy, over gRPC
and over REST (transcoded), with JWT checks and both rate limits on.

Starts a private local stack (router, registry, orchestrator, Triton, ratelimit on Redis,
Envoy), registers the demo models, then runs each target at each concurrency for a fixed time
and prints p50, p99 and requests/s, with each row's p50 against the router direct.

    .venv/bin/python bench/edge_bench.py [--seconds 4] [--concurrency 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc

from tensorway.devstack import DevStackSettings, Stack, register_demo_models
from tensorway.devstack._envoy import jwt_key_dir
from tensorway.devstack._services import Ratelimit
from tensorway.devstack._stack import default_components
from tensorway.edge.config import load_values
from tensorway.edge.keys import PRIVATE_KEY_FILE, mint_token
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc

ONES = [1] * 16
SEQUENCE = list(range(16))


def grpc_request() -> pb.InferRequest:
    request = pb.InferRequest(model_name="simple")
    for name, values in (("INPUT0", SEQUENCE), ("INPUT1", ONES)):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16]).contents.int_contents.extend(values)
    return request


REST_BODY = json.dumps(
    {
        "inputs": [
            {"name": name, "datatype": "INT32", "shape": [1, 16], "contents": {"int_contents": values}}
            for name, values in (("INPUT0", SEQUENCE), ("INPUT1", ONES))
        ]
    }
)


async def measure(call: Callable[[], Awaitable[None]], concurrency: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def run(
    router: str, envoy: str, token: str, seconds: float, concurrencies: list[int]
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    auth = (("authorization", f"Bearer {token}"),)
    request = grpc_request()
    async with (
        grpc.aio.insecure_channel(router) as direct,
        grpc.aio.insecure_channel(envoy) as edge,
        aiohttp.ClientSession() as http,
    ):
        direct_stub, edge_stub = pb_grpc.InferenceServiceStub(direct), pb_grpc.InferenceServiceStub(edge)

        async def router_grpc() -> None:
            await direct_stub.Infer(request, timeout=10)

        async def envoy_grpc() -> None:
            await edge_stub.Infer(request, metadata=auth, timeout=10)

        async def envoy_rest() -> None:
            async with http.post(
                f"http://{envoy}/v1/models/simple:infer",
                data=REST_BODY,
                headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
            ) as reply:
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"REST answered {reply.status}")

        targets = {"router gRPC (direct)": router_grpc, "Envoy gRPC": envoy_grpc, "Envoy REST": envoy_rest}
        for concurrency in concurrencies:
            for name, call in targets.items():
                await measure(call, concurrency, min(1.0, seconds))  # warm up
                latencies = sorted(await measure(call, concurrency, seconds))
                rows.append(
                    {
                        "target": name,
                        "concurrency": concurrency,
                        "p50_ms": statistics.median(latencies) * 1000,
                        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
                        "rps": len(latencies) / seconds,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    state_dir = Path(tempfile.mkdtemp(prefix="tensorway-edge-bench-"))
    state_dir.chmod(0o755)  # PostgreSQL runs as an unprivileged user under root
    # The shipped limits' shape, high enough that no request is refused: the ratelimit service is
    # still asked about every request.
    limits = state_dir / "limits.json"
    limits.write_text(
        json.dumps(
            {
                "limits": [
                    {"name": "tenant-requests", "match": {"tenant": "*"}, "limit": 10**8, "per": "second"},
                    {"name": "model-requests", "match": {"model": "*"}, "limit": 10**8, "per": "second"},
                ]
            }
        )
    )
    components = [Ratelimit(limits) if c.name == "ratelimit" else c for c in default_components()]
    stack = Stack(
        DevStackSettings(state_dir=state_dir).without_pinned_ports(),
        state_dir=state_dir,
        components=components,
        die_with_parent=True,
    )
    try:
        state = stack.up(["router", "envoy"])
        register_demo_models(state)
        jwt = load_values("local")["jwt"]
        token = mint_token(
            jwt_key_dir(state_dir) / PRIVATE_KEY_FILE,
            tenant="bench",
            issuer=jwt["issuer"],
            audience=jwt["audiences"][0],
        )
        addresses = state.addresses()
        rows = asyncio.run(
            run(addresses["router"], addresses["envoy"], token, args.seconds, args.concurrency)
        )
    finally:
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    baseline = {row["concurrency"]: row["p50_ms"] for row in rows if row["target"] == "router gRPC (direct)"}
    print(f"{'target':24} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'p50 vs direct':>14}")
    for row in rows:
        ratio = float(row["p50_ms"]) / float(baseline[row["concurrency"]])  # type: ignore[arg-type]
        print(
            f"{row['target']:24} {row['concurrency']:>4} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}"
            f" {row['rps']:>8.0f} {ratio:>13.2f}x"
        )


if __name__ == "__main__":
    main()
