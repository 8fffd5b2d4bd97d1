"""The edge's cost: the `simple` model straight to Triton, through the router directly and through
Envoy, over gRPC, over REST (transcoded) and over Triton's V2 HTTP protocol (binary tensors, as
tritonclient.http sends them), with JWT checks and both rate limits on.

Starts a private local stack (router with its global limits leased from Redis, registry,
orchestrator, Triton, Envoy), registers the demo models, then runs each target at each
concurrency of the sweep for a fixed time and prints p50, p99 and requests/s, with each row's
ratios against Triton direct (and the p50 against the router direct, the edge's own share).

Floors measured in the same run (`hopfloor.py`): one and two bare Python `grpc.aio` proxies
forwarding bytes to Triton (the cost of the mesh's two Python hops with no logic), and Envoy
with no filters routing gRPC straight to the router (the cost of the edge's hop with nothing on
it). Every mesh row is read against its floor: `floor +ms` and `floor x` are its p50 above its
floor's p50 (difference, ratio); the front door's aims are checked at the end.

    .venv/bin/python bench/edge_bench.py [--quick] [--json PATH] [--seconds 5] [--concurrency 1 4 16 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import ssl
import struct
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import grpc
from benchkit import Results, add_common_arguments, cell_seconds, mode, sweep_cell
from hopfloor import bare_envoy, bare_proxy
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from tensorway.devstack import DevStackSettings, Stack, register_demo_models
from tensorway.devstack._envoy import ENVOY_BINARY, jwt_key_dir, local_certificates
from tensorway.devstack._services import Router
from tensorway.devstack._stack import default_components
from tensorway.edge.config import load_values
from tensorway.edge.keys import PRIVATE_KEY_FILE, mint_token
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc

GROUP = "simple (INT32 [1,16] x2)"
TRITON_DIRECT = "Triton direct"
ROUTER_DIRECT = "router gRPC (direct)"
ONE_HOP = "floor: 1 bare proxy -> Triton"
TWO_HOPS = "floor: 2 bare proxies -> Triton"
BARE_ENVOY = "floor: Envoy, no filters -> router"
# Each mesh row's floor: the bare hops standing where its own stand.
FLOORS = {
    ROUTER_DIRECT: TWO_HOPS,
    "router V2 HTTP (direct)": TWO_HOPS,
    "Envoy gRPC": BARE_ENVOY,
    "Envoy REST": BARE_ENVOY,
    "Envoy V2 HTTP": BARE_ENVOY,
}
ONES = [1] * 16
SEQUENCE = list(range(16))


def grpc_request() -> pb.InferRequest:
    request = pb.InferRequest(model_name="simple")
    for name, values in (("INPUT0", SEQUENCE), ("INPUT1", ONES)):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16]).contents.int_contents.extend(values)
    return request


def triton_request() -> triton_pb.ModelInferRequest:
    request = triton_pb.ModelInferRequest(model_name="simple")
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

# Triton's V2 HTTP protocol with the binary tensor extension, as tritonclient.http sends it: a JSON
# header, then each input's bytes; every output asked for in binary.
V2_HEADER = json.dumps(
    {
        "inputs": [
            {"name": name, "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}}
            for name in ("INPUT0", "INPUT1")
        ],
        "parameters": {"binary_data_output": True},
    }
).encode()
V2_BODY = V2_HEADER + struct.pack("<16i", *SEQUENCE) + struct.pack("<16i", *ONES)


async def run(
    addresses: dict[str, str],
    ca: Path,
    token: str,
    seconds: float,
    concurrencies: list[int],
    results: Results,
) -> None:
    router, envoy = addresses["router"], addresses["envoy"]
    tls = ssl.create_default_context(cafile=ca)
    ca_pem = ca.read_bytes()  # noqa: ASYNC240  # before any request is timed
    auth = (("authorization", f"Bearer {token}"),)
    request, to_triton = grpc_request(), triton_request()
    async with (
        grpc.aio.insecure_channel(addresses["triton_grpc"]) as triton,
        grpc.aio.insecure_channel(router) as direct,
        grpc.aio.insecure_channel(addresses["proxy"]) as proxy,
        grpc.aio.insecure_channel(addresses["proxy2"]) as proxy2,
        grpc.aio.insecure_channel(addresses["bare_envoy"]) as bare,
        grpc.aio.secure_channel(envoy, grpc.ssl_channel_credentials(ca_pem)) as edge,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http,
    ):
        triton_stub = triton_grpc.GRPCInferenceServiceStub(triton)
        direct_stub, edge_stub = pb_grpc.InferenceServiceStub(direct), pb_grpc.InferenceServiceStub(edge)
        proxy_stub, proxy2_stub = (
            triton_grpc.GRPCInferenceServiceStub(proxy),
            triton_grpc.GRPCInferenceServiceStub(proxy2),
        )
        bare_stub = pb_grpc.InferenceServiceStub(bare)

        async def triton_direct() -> None:
            await triton_stub.ModelInfer(to_triton, timeout=10)

        async def one_hop() -> None:
            await proxy_stub.ModelInfer(to_triton, timeout=10)

        async def two_hops() -> None:
            await proxy2_stub.ModelInfer(to_triton, timeout=10)

        async def bare_envoy_grpc() -> None:
            await bare_stub.Infer(request, timeout=10)

        async def router_grpc() -> None:
            await direct_stub.Infer(request, timeout=10)

        async def envoy_grpc() -> None:
            await edge_stub.Infer(request, metadata=auth, timeout=10)

        async def envoy_rest() -> None:
            async with http.post(
                f"https://{envoy}/v1/models/simple:infer",
                data=REST_BODY,
                headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
            ) as reply:
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"REST answered {reply.status}")

        async def v2_http(url: str, headers: dict[str, str]) -> None:
            async with http.post(
                url, data=V2_BODY, headers={**headers, "Inference-Header-Content-Length": str(len(V2_HEADER))}
            ) as reply:
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"V2 HTTP answered {reply.status}")

        async def router_v2_http() -> None:
            await v2_http(f"http://{addresses['router_http']}/v2/models/simple/infer", {})

        async def envoy_v2_http() -> None:
            await v2_http(f"https://{envoy}/v2/models/simple/infer", {"authorization": f"Bearer {token}"})

        targets: dict[str, Callable[[], Awaitable[None]]] = {
            TRITON_DIRECT: triton_direct,
            ONE_HOP: one_hop,
            TWO_HOPS: two_hops,
            ROUTER_DIRECT: router_grpc,
            BARE_ENVOY: bare_envoy_grpc,
            "Envoy gRPC": envoy_grpc,
            "Envoy REST": envoy_rest,
            "router V2 HTTP (direct)": router_v2_http,
            "Envoy V2 HTTP": envoy_v2_http,
        }
        for concurrency in concurrencies:
            for name, call in targets.items():
                results.cells.append(await sweep_cell(GROUP, name, call, concurrency, seconds))
    for cell in results.cells:
        router_cell = next(
            c for c in results.cells if c.path == ROUTER_DIRECT and c.concurrency == cell.concurrency
        )
        cell.extra["p50 / router p50"] = (
            cell.p50_ms / router_cell.p50_ms if cell.p50_ms and router_cell.p50_ms else None
        )
    read_against_floors(results)


def read_against_floors(results: Results) -> None:
    """Each mesh row's p50 against its floor's, and the front door's aims for the edge."""
    cells = {(cell.path, cell.concurrency): cell for cell in results.cells}
    for cell in results.cells:
        floor = cells.get((FLOORS.get(cell.path, ""), cell.concurrency))
        if floor is not None and cell.p50_ms and floor.p50_ms:
            cell.extra["floor +ms"] = cell.p50_ms - floor.p50_ms
            cell.extra["floor x"] = cell.p50_ms / floor.p50_ms
    router = cells.get((ROUTER_DIRECT, 1))
    for path, within in (("Envoy gRPC", 0.3), ("Envoy REST", 0.8)):
        cell = cells.get((path, 1))
        if cell is not None and router is not None and cell.p50_ms and router.p50_ms:
            added = cell.p50_ms - router.p50_ms
            results.aim(
                f"{path} adds at most {within} ms p50 over the router direct (1 in flight)",
                f"{added:+.3f} ms",
                added <= within,
            )
    router16, envoy16 = cells.get((ROUTER_DIRECT, 16)), cells.get(("Envoy gRPC", 16))
    if router16 is not None and envoy16 is not None and router16.throughput:
        share = envoy16.throughput / router16.throughput
        results.aim(
            "Envoy gRPC throughput at least 0.8x the router's (16 in flight)", f"{share:.2f}x", share >= 0.8
        )


def envoy_version() -> str:
    """The version Envoy reports of itself, e.g. `1.40.0/Clean/RELEASE/BoringSSL`."""
    answer = subprocess.run(
        [str(ENVOY_BINARY.locate("envoy")), "--version"], capture_output=True, text=True, check=True
    )
    return answer.stdout.strip().rpartition("version: ")[2].split("/", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    args = parser.parse_args()
    seconds = cell_seconds(args)
    results = Results(
        benchmark="edge",
        title="The edge: Triton direct, the router direct, and Envoy (gRPC, REST and V2 HTTP) in front of it",
        mode=mode(args),
        baseline=TRITON_DIRECT,
        throughput_unit="req/s",
        settings={"seconds per cell": seconds, "concurrency": args.concurrency},
        versions={"Envoy": envoy_version()},
        notes=[
            "Envoy checks a JWT and a local per-tenant limit; the router counts every request against"
            " global limits through leases of Redis windows (Redis only when a lease is spent).",
            "Floors: the bare proxies forward bytes with no logic (hopfloor.py); the no-filter Envoy"
            " takes plaintext HTTP/2 (the mesh's Envoy terminates TLS), so what the edge's Envoy adds"
            " over it is TLS, JWT, the local limit, transcoding and the access log.",
        ],
    )
    state_dir = Path(tempfile.mkdtemp(prefix="tensorway-edge-bench-"))
    state_dir.chmod(0o755)  # PostgreSQL runs as an unprivileged user under root
    # The shipped limits' shape, high enough that no request is refused: every request is still
    # counted against all of them, though slices this large send a router to Redis rarely.
    limits = state_dir / "limits.json"
    limits.write_text(
        json.dumps(
            {
                "limits": [
                    {"name": "tenant-requests", "match": {"tenant": "*"}, "limit": 10**8, "per": "second"},
                    {
                        "name": "tenant-rows",
                        "match": {"tenant": "*"},
                        "cost": "rows",
                        "limit": 10**9,
                        "per": "minute",
                    },
                    {
                        "name": "tenant-bytes",
                        "match": {"tenant": "*"},
                        "cost": "bytes",
                        "limit": 10**12,
                        "per": "minute",
                    },
                    {"name": "model-requests", "match": {"model": "*"}, "limit": 10**8, "per": "second"},
                ]
            }
        )
    )
    components = [Router(limits_file=limits) if c.name == "router" else c for c in default_components()]
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
        ca = local_certificates(state_dir).ca
        addresses = dict(state.addresses())
        with ExitStack() as floors:
            addresses["proxy"] = floors.enter_context(
                bare_proxy(addresses["triton_grpc"], state_dir / "proxy.log")
            )
            addresses["proxy2"] = floors.enter_context(
                bare_proxy(addresses["proxy"], state_dir / "proxy2.log")
            )
            addresses["bare_envoy"] = floors.enter_context(
                bare_envoy(ENVOY_BINARY.locate("envoy"), addresses["router"], state_dir)
            )
            asyncio.run(run(addresses, ca, token, seconds, args.concurrency, results))
    finally:
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)
    results.write(args.json)


if __name__ == "__main__":
    main()
