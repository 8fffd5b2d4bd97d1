"""The edge's cost: the `simple` model straight to Triton, through the router directly and through
Envoy, over gRPC, over REST (transcoded) and over Triton's V2 HTTP protocol (binary tensors, as
tritonclient.http sends them), with JWT checks and both rate limits on.

Starts a private local stack (router with its global limits leased from Redis, registry,
orchestrator, Triton, Envoy), registers the demo models, then runs each target at each
concurrency of the sweep for a fixed time (at one in flight in turns, in rounds, pooled:
`benchkit.sweep_cells`) and prints p50, p99 and requests/s, with each row's ratios against
Triton direct (and the p50 against the router direct, the edge's own share).

Floors measured in the same run (`hopfloor.py`): one and two bare Python `grpc.aio` proxies
forwarding bytes to Triton (the cost of the mesh's two Python hops with no logic), and Envoy
with no filters routing gRPC straight to the router (the cost of the edge's hop with nothing on
it). Every mesh row is read against its floor: `floor +ms` and `floor x` are its p50 above its
floor's p50 (difference, ratio); the front door's aims are checked at the end.

    .venv/bin/python bench/edge_bench.py [--quick] [--json PATH] [--seconds 5] [--concurrency 1 4 16 64]

`--variants ROUNDS` measures instead where the edge's Envoy spends its time: the shipped config
beside copies of it with one part removed or one setting changed (`VARIANTS`), each its own Envoy
in front of the same router, over gRPC and REST at the first concurrency given; the targets run
in turn, each for `--seconds`, for ROUNDS rounds, and each row is the median over the rounds of
its p50 and of its p50's difference from the router direct and from the shipped config measured
in the same round.

    .venv/bin/python bench/edge_bench.py --variants 5 --seconds 1 --concurrency 1
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import shutil
import ssl
import statistics
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from benchkit import (
    Cell,
    Results,
    add_common_arguments,
    cell_seconds,
    free_port,
    keep_in_flight,
    mode,
    stop,
    sweep_cells,
)
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
            results.cells.extend(await sweep_cells(GROUP, targets, concurrency, seconds))
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


# --variants: the shipped config with one part removed or one setting changed.
Config = dict[str, Any]
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
JWT = "envoy.filters.http.jwt_authn"
INFERENCE_ROUTE = "/tensorway.inference.v1.InferenceService/"
# Sent with every gRPC call of --variants; only the one-hop variant routes by it.
MODEL_HEADER = ("x-tensorway-model", "simple")
ORCHESTRATOR_DIRECT = "orchestrator gRPC (direct)"


def _hcm(config: Config) -> Config:
    hcm: Config = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _routes(config: Config) -> list[Config]:
    routes: list[Config] = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def _cluster(config: Config, name: str) -> Config:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == name)


def _without_filters(*names: str) -> Callable[[Config], None]:
    def edit(config: Config) -> None:
        hcm = _hcm(config)
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in names]
        for holder in (hcm["route_config"]["virtual_hosts"][0], *_routes(config)):
            for name in names:
                holder.get("typed_per_filter_config", {}).pop(name, None)

    return edit


def _without_tls(config: Config) -> None:
    del config["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]


def _without_access_log(config: Config) -> None:
    del _hcm(config)["access_log"]


def _with_tracing(config: Config) -> None:
    """As compose and Kubernetes ship it (1 % sampled), to a collector port nothing listens on."""
    _hcm(config)["tracing"] = {
        "client_sampling": {"value": 100},
        "random_sampling": {"value": 1},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"}, "timeout": "1s"},
                "service_name": "envoy",
            },
        },
    }
    collector = copy.deepcopy(_cluster(config, "registry"))
    for key in ("health_checks", "outlier_detection", "circuit_breakers"):
        collector.pop(key, None)
    collector["name"] = collector["load_assignment"]["cluster_name"] = "otel_collector"
    endpoint = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = free_port()
    config["static_resources"]["clusters"].append(collector)


def _without_stats(config: Config) -> None:
    config["stats_config"] = {"stats_matcher": {"reject_all": True}}


def _without_retries(config: Config) -> None:
    for route in _routes(config):
        route.get("route", {}).pop("retry_policy", None)


def _jwt_cache(config: Config) -> None:
    jwt = next(f for f in _hcm(config)["http_filters"] if f["name"] == JWT)
    for provider in jwt["typed_config"]["providers"].values():
        provider["jwt_cache_config"] = {"jwt_cache_size": 1000}


def _no_transcoder_on_grpc_routes(config: Config) -> None:
    for route in _routes(config):
        if route["match"].get("prefix", "").startswith(("/tensorway.", "/inference.", "/grpc.")):
            route.setdefault("typed_per_filter_config", {})[TRANSCODER] = {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                "disabled": True,
            }


def _as_before_issue_17(config: Config) -> None:
    """The config as shipped before: every JWT verified anew, the transcoder on gRPC routes too."""
    jwt = next(f for f in _hcm(config)["http_filters"] if f["name"] == JWT)
    for provider in jwt["typed_config"]["providers"].values():
        provider.pop("jwt_cache_config", None)
    for route in _routes(config):
        if route["match"].get("prefix", "").startswith(("/tensorway.", "/inference.", "/grpc.")):
            route.get("typed_per_filter_config", {}).pop(TRANSCODER, None)


def _h2_windows(size: int) -> Callable[[Config], None]:
    def edit(config: Config) -> None:
        windows = {"initial_stream_window_size": size, "initial_connection_window_size": size}
        _hcm(config)["http2_protocol_options"] = dict(windows)
        options = _cluster(config, "router")["typed_extension_protocol_options"]
        next(iter(options.values()))["explicit_http_config"]["http2_protocol_options"] = dict(windows)

    return edit


def _buffer_limits(size: int) -> Callable[[Config], None]:
    def edit(config: Config) -> None:
        config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = size
        _cluster(config, "router")["per_connection_buffer_limit_bytes"] = size

    return edit


def _all(*edits: Callable[[Config], None]) -> Callable[[Config], None]:
    def edit(config: Config) -> None:
        for one in edits:
            one(config)

    return edit


_MINOR_FILTERS = (
    "envoy.filters.http.health_check",
    "envoy.filters.http.cors",
    "envoy.filters.http.header_mutation",
    "envoy.filters.http.buffer",
    "envoy.filters.http.grpc_web",
)
_EVERY_FILTER = (
    *_MINOR_FILTERS,
    JWT,
    TRANSCODER,
    "envoy.filters.http.rbac",
    "envoy.filters.http.local_ratelimit",
)


def _to_orchestrator(address: str) -> Callable[[Config], None]:
    """One Python hop: the `simple` model's inference routed by a header naming the model straight
    to its pool's orchestrator, as a control plane could program Envoy for each routed model."""

    def edit(config: Config) -> None:
        host, port = address.rsplit(":", 1)
        cluster = copy.deepcopy(_cluster(config, "router"))
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = "orchestrator"
        cluster["load_assignment"]["endpoints"] = [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}
                ]
            }
        ]
        config["static_resources"]["clusters"].append(cluster)
        routes = _routes(config)
        index, route = next(
            (i, r) for i, r in enumerate(routes) if r["match"].get("prefix") == INFERENCE_ROUTE
        )
        direct = copy.deepcopy(route)
        direct["match"]["headers"] = [{"name": MODEL_HEADER[0], "string_match": {"exact": MODEL_HEADER[1]}}]
        direct["route"]["cluster"] = "orchestrator"
        routes.insert(index, direct)

    return edit


@dataclass(frozen=True)
class Variant:
    """A change to the shipped config (None: as shipped) and Envoy's command-line arguments."""

    edit: Callable[[Config], None] | None = None
    arguments: tuple[str, ...] = ()
    rest: bool = True


VARIANTS = {
    "shipped": Variant(),
    "- TLS": Variant(_without_tls),
    "- JWT and rbac (which reads its claims)": Variant(_without_filters(JWT, "envoy.filters.http.rbac")),
    "- rbac": Variant(_without_filters("envoy.filters.http.rbac")),
    "- local limit": Variant(_without_filters("envoy.filters.http.local_ratelimit")),
    "- transcoder": Variant(_without_filters(TRANSCODER), rest=False),
    "- health_check, cors, header_mutation, buffer, grpc_web": Variant(_without_filters(*_MINOR_FILTERS)),
    "- access log": Variant(_without_access_log),
    "- retry policy": Variant(_without_retries),
    "- stats (reject_all)": Variant(_without_stats),
    "+ tracing (1 %)": Variant(_with_tracing),
    "+ JWT cache": Variant(_jwt_cache),
    "transcoder off on gRPC routes": Variant(_no_transcoder_on_grpc_routes),
    "+ JWT cache, transcoder off on gRPC routes": Variant(_all(_jwt_cache, _no_transcoder_on_grpc_routes)),
    "as before: no JWT cache, transcoder on gRPC routes": Variant(_as_before_issue_17),
    "HTTP/2 windows 1 MiB": Variant(_h2_windows(1 << 20)),
    "buffer limits 32 KiB": Variant(_buffer_limits(32 << 10)),
    "--concurrency 2": Variant(arguments=("--concurrency", "2")),
    "TLS, no filters, access log": Variant(_without_filters(*_EVERY_FILTER), rest=False),
    "no TLS, no filters, no access log": Variant(
        _all(_without_tls, _without_filters(*_EVERY_FILTER), _without_access_log), rest=False
    ),
}


@dataclass(frozen=True)
class VariantEnvoy:
    address: str
    tls: bool
    rest: bool
    pid: int


@contextmanager
def variant_envoy(envoy: Path, shipped: Config, variant: Variant, workdir: Path) -> Iterator[VariantEnvoy]:
    """An Envoy with the variant's config on ports of its own, one worker unless the variant
    says otherwise (as the stack runs it), until the block ends."""
    config = copy.deepcopy(shipped)
    if variant.edit is not None:
        variant.edit(config)
    listener = config["static_resources"]["listeners"][0]
    port, admin = free_port(), free_port()
    listener["address"]["socket_address"]["port_value"] = port
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    # As the stack runs its Envoy; a variant's arguments replace these (Envoy takes each once).
    options = {"--concurrency": "1", "--file-flush-interval-msec": "1000"}
    options.update(zip(variant.arguments[::2], variant.arguments[1::2], strict=True))
    arguments = [part for option in options.items() for part in option]
    with (workdir / "envoy.log").open("ab") as output:
        process = subprocess.Popen(
            [str(envoy), "-c", str(path), "--disable-hot-restart", "-l", "warning", *arguments],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as ready:  # nosec B310
                    if ready.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        else:
            raise RuntimeError(f"Envoy variant in {workdir} exited: see envoy.log")
        yield VariantEnvoy(
            f"127.0.0.1:{port}", "transport_socket" in listener["filter_chains"][0], variant.rest, process.pid
        )
    finally:
        stop(process)


async def measure_variants(
    addresses: dict[str, str],
    envoys: dict[str, VariantEnvoy],
    ca: Path,
    token: str,
    seconds: float,
    concurrency: int,
    rounds: int,
    results: Results,
) -> None:
    """Every variant over gRPC and REST, and the router direct, in turn for `rounds` rounds."""
    tls = ssl.create_default_context(cafile=ca)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())  # noqa: ASYNC240  # before any timing
    auth = (("authorization", f"Bearer {token}"), MODEL_HEADER)
    request = grpc_request()
    rest_headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)))
        direct = pb_grpc.InferenceServiceStub(
            await stack.enter_async_context(grpc.aio.insecure_channel(addresses["router"]))
        )
        targets: dict[tuple[str, str], Callable[[], Awaitable[None]]] = {}

        async def router_grpc() -> None:
            await direct.Infer(request, timeout=10)

        targets["gRPC", ROUTER_DIRECT] = router_grpc
        orchestrator = pb_grpc.InferenceServiceStub(
            await stack.enter_async_context(grpc.aio.insecure_channel(addresses["orchestrator"]))
        )

        async def orchestrator_grpc() -> None:
            await orchestrator.Infer(request, timeout=10)

        targets["gRPC", ORCHESTRATOR_DIRECT] = orchestrator_grpc
        for name, envoy in envoys.items():
            channel = (
                grpc.aio.secure_channel(envoy.address, credentials)
                if envoy.tls
                else grpc.aio.insecure_channel(envoy.address)
            )
            stub = pb_grpc.InferenceServiceStub(await stack.enter_async_context(channel))

            async def over_grpc(stub: pb_grpc.InferenceServiceStub = stub) -> None:
                await stub.Infer(request, metadata=auth, timeout=10)

            targets["gRPC", name] = over_grpc
            if envoy.rest:
                url = f"{'https' if envoy.tls else 'http'}://{envoy.address}/v1/models/simple:infer"

                async def over_rest(url: str = url) -> None:
                    async with http.post(url, data=REST_BODY, headers=rest_headers) as reply:
                        await reply.read()
                        if reply.status != 200:
                            raise RuntimeError(f"REST answered {reply.status}")

                targets["REST", name] = over_rest
        for call in targets.values():
            await until_answered(call)
        cells: dict[tuple[str, str], list[Cell]] = {key: [] for key in targets}
        keys = list(targets)
        for round_ in range(rounds):
            # Each round starts one target further on, so no target always follows the same one.
            shift = round_ * len(keys) // max(rounds, 1)
            for key in keys[shift:] + keys[:shift]:
                envoy = envoys.get(key[1])
                await keep_in_flight(targets[key], concurrency, min(0.5, seconds))
                cpu = envoy_cpu_seconds(envoy.pid) if envoy else 0.0
                latencies, elapsed = await keep_in_flight(targets[key], concurrency, seconds)
                cell = Cell.from_latencies(key[0], key[1], concurrency, elapsed, latencies)
                if envoy is not None and latencies:
                    cell.extra["Envoy CPU us/req"] = (
                        (envoy_cpu_seconds(envoy.pid) - cpu) / len(latencies) * 1e6
                    )
                cells[key].append(cell)
    router = cells["gRPC", ROUTER_DIRECT]
    for (protocol, name), measured in cells.items():
        shipped = cells.get((protocol, "shipped"), [])
        results.cells.append(
            Cell(
                group=f"variants, {protocol}",
                path=name,
                concurrency=concurrency,
                seconds=sum(cell.seconds for cell in measured),
                throughput=statistics.median(cell.throughput for cell in measured),
                requests=sum(cell.requests or 0 for cell in measured),
                p50_ms=statistics.median(cell.p50_ms or 0 for cell in measured),
                p99_ms=statistics.median(cell.p99_ms or 0 for cell in measured),
                extra={
                    # Envoy's own CPU time (all its threads) per request: scheduling noise on a
                    # shared machine moves latencies by more than a filter costs, but not this.
                    "Envoy CPU us/req": _median_extra(measured, "Envoy CPU us/req"),
                    "router +ms": _median_difference(measured, router),
                    "shipped +ms": _median_difference(measured, shipped) if shipped else None,
                },
            )
        )


def envoy_cpu_seconds(pid: int) -> float:
    """The CPU time all of a process's threads have run, from the scheduler's nanosecond counters."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks.iterdir()) / 1e9


def _median_extra(cells: list[Cell], name: str) -> float | None:
    values = [value for cell in cells if (value := cell.extra.get(name)) is not None]
    return statistics.median(values) if values else None


def _median_difference(cells: list[Cell], others: list[Cell]) -> float:
    return statistics.median((a.p50_ms or 0) - (b.p50_ms or 0) for a, b in zip(cells, others, strict=True))


async def until_answered(call: Callable[[], Awaitable[None]], attempts: int = 100) -> None:
    """The first answer: an Envoy just started may not have seen the router healthy yet."""
    for attempt in range(attempts):
        try:
            await call()
            return
        except (grpc.RpcError, aiohttp.ClientError, RuntimeError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.1)


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
    parser.add_argument(
        "--variants",
        type=int,
        metavar="ROUNDS",
        help="measure the shipped Envoy config against its variants for ROUNDS rounds instead",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="with --variants: only the shipped config and the variants named (as VARIANTS spells them)",
    )
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
        if args.variants:
            shipped = yaml.safe_load((state_dir / "envoy" / "envoy.yaml").read_text())
            variants = {
                **VARIANTS,
                "one Python hop: -> orchestrator": Variant(
                    _to_orchestrator(addresses["orchestrator"]), rest=False
                ),
            }
            if args.only:
                variants = {name: v for name, v in variants.items() if name == "shipped" or name in args.only}
            with ExitStack() as running:
                envoys = {
                    name: running.enter_context(
                        variant_envoy(
                            ENVOY_BINARY.locate("envoy"), shipped, variant, state_dir / f"variant-{i}"
                        )
                    )
                    for i, (name, variant) in enumerate(variants.items())
                }
                asyncio.run(
                    measure_variants(
                        addresses, envoys, ca, token, seconds, args.concurrency[0], args.variants, results
                    )
                )
        else:
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
