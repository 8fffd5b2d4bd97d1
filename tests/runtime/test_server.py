"""The server factory and interceptor against a real grpc.aio server and real clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.runtime import (
    InvalidArgument,
    NotFound,
    ServiceBinding,
    ServiceServer,
    ServiceSettings,
    context,
    create_channel,
    create_server,
)

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]


class ProbeServicer(pb_grpc.InferenceServiceServicer):
    """Behaves by model name, so each test picks the branch it exercises."""

    def __init__(self, downstream: str | None = None) -> None:
        self.downstream = downstream

    async def Infer(self, request: pb.InferRequest, ctx: Any) -> pb.InferResponse:
        match request.model_name:
            case "echo":
                current = context.current.get()
                assert current is not None
                remaining = current.time_remaining()
                params = {
                    "request_id": tensor_pb2.Parameter(string_value=current.request_id),
                    "tenant": tensor_pb2.Parameter(string_value=current.tenant),
                    "remaining": tensor_pb2.Parameter(double_value=-1.0 if remaining is None else remaining),
                    "traceparent": tensor_pb2.Parameter(
                        string_value=dict(ctx.invocation_metadata()).get("traceparent", "")
                    ),
                }
                return pb.InferResponse(model_name="echo", parameters=params)
            case "forward":
                assert self.downstream is not None
                async with create_channel(self.downstream) as channel:
                    stub = pb_grpc.InferenceServiceStub(channel)
                    return await stub.Infer(pb.InferRequest(model_name=request.model_version))
            case "invalid":
                raise InvalidArgument("bad shape", [])
            case "abort":
                await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
            case "slow":
                await asyncio.sleep(5)
            case "boom":
                raise RuntimeError("secret internals: password=hunter2")
        raise NotFound("model", request.model_name)

    async def StreamInfer(
        self, request_iterator: AsyncIterator[pb.StreamInferRequest], ctx: Any
    ) -> AsyncIterator[pb.StreamInferResponse]:
        async for item in request_iterator:
            if item.request.model_name == "boom":
                raise RuntimeError("secret internals")
            yield pb.StreamInferResponse(id=item.request.id, response=pb.InferResponse(id=item.request.id))


async def start_probe(downstream: str | None = None) -> tuple[ServiceServer, str]:
    server, port = create_server(
        "probe",
        ServiceSettings(),
        [ServiceBinding(pb_grpc.add_InferenceServiceServicer_to_server, ProbeServicer(downstream), SERVICE)],
    )
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def probe() -> AsyncIterator[tuple[ServiceServer, str]]:
    server, address = await start_probe()
    yield server, address
    await server.stop()


@pytest.fixture
async def stub(probe: tuple[ServiceServer, str]) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(probe[1]) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


async def test_request_id_and_tenant_come_from_metadata(stub: pb_grpc.InferenceServiceStub) -> None:
    response = await stub.Infer(
        pb.InferRequest(model_name="echo"), metadata=(("x-request-id", "req-1"), ("x-tenant-id", "acme"))
    )
    assert response.parameters["request_id"].string_value == "req-1"
    assert response.parameters["tenant"].string_value == "acme"


async def test_request_id_is_minted_when_absent(stub: pb_grpc.InferenceServiceStub) -> None:
    response = await stub.Infer(pb.InferRequest(model_name="echo"))
    assert len(response.parameters["request_id"].string_value) == 32
    assert response.parameters["tenant"].string_value == context.DEFAULT_TENANT


async def test_tensorway_errors_reach_the_client_with_details(stub: pb_grpc.InferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Infer(pb.InferRequest(model_name="unknown"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "NOT_FOUND"


async def test_unexpected_errors_become_internal_without_leaking(stub: pb_grpc.InferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Infer(pb.InferRequest(model_name="boom"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (caught.value.details() or "")
    assert error_info(caught.value).reason == "INTERNAL"


async def test_a_servicer_abort_keeps_its_code(stub: pb_grpc.InferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Infer(pb.InferRequest(model_name="abort"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_streaming_errors_are_mapped_too(stub: pb_grpc.InferenceServiceStub) -> None:
    async def requests() -> AsyncIterator[pb.StreamInferRequest]:
        yield pb.StreamInferRequest(request=pb.InferRequest(model_name="ok", id="1"))
        yield pb.StreamInferRequest(request=pb.InferRequest(model_name="boom", id="2"))

    call = stub.StreamInfer(requests())
    first = await call.read()
    assert first.id == "1"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")


async def test_downstream_errors_pass_through_with_details_and_context_propagates(
    probe: tuple[ServiceServer, str],
) -> None:
    front, front_address = await start_probe(downstream=probe[1])
    try:
        async with grpc.aio.insecure_channel(front_address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Infer(pb.InferRequest(model_name="forward", model_version="invalid"))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(caught.value).reason == "INVALID_ARGUMENT"

            echoed = await stub.Infer(
                pb.InferRequest(model_name="forward", model_version="echo"),
                metadata=(("x-request-id", "trace-me"), ("x-tenant-id", "acme")),
                timeout=3.0,
            )
            # The downstream hop saw the caller's identity and a deadline no later than the caller's.
            assert echoed.parameters["request_id"].string_value == "trace-me"
            assert echoed.parameters["tenant"].string_value == "acme"
            # (the deadline crosses the wire in coarse units, so allow a little slack)
            assert 0 < echoed.parameters["remaining"].double_value <= 3.05
    finally:
        await front.stop()


async def test_an_incoming_trace_context_reaches_downstream_calls(probe: tuple[ServiceServer, str]) -> None:
    front, front_address = await start_probe(downstream=probe[1])
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        async with grpc.aio.insecure_channel(front_address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            echoed = await stub.Infer(
                pb.InferRequest(model_name="forward", model_version="echo"),
                metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),),
            )
            # Tracing is not exporting in this process, yet the caller's trace goes on downstream.
            assert echoed.parameters["traceparent"].string_value.split("-")[1] == trace_id
            untraced = await stub.Infer(pb.InferRequest(model_name="forward", model_version="echo"))
            assert untraced.parameters["traceparent"].string_value == ""
    finally:
        await front.stop()


async def test_deadline_exceeded_is_reported(stub: pb_grpc.InferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Infer(pb.InferRequest(model_name="slow"), timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_health_serves_and_goes_not_serving_on_shutdown() -> None:
    server, address = await start_probe()
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE.full_name):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await server.set_serving(False, SERVICE.full_name)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    cleaned: list[str] = []

    async def cleanup() -> None:
        cleaned.append("closed")

    server.on_stop(cleanup)
    await server.stop()
    await server.stop()  # a second stop is harmless
    assert cleaned == ["closed"]


def sigterm_once_logged(service: str, environment: dict[str, str], marker: str) -> tuple[int, str]:
    """Run `tensorway serve SERVICE`, send it SIGTERM once a line of its output holds `marker`,
    and return its exit status and whole output."""
    tensorway = str(Path(sys.executable).parent / "tensorway")
    process = subprocess.Popen(
        [tensorway, "serve", service, "--port", "0"],
        env={**os.environ, **environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            break
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=60)
    return process.returncode, "".join(lines) + rest


def test_a_service_given_sigterm_runs_its_whole_stop_and_exits_0() -> None:
    """`serve` answers SIGTERM with the whole graceful stop: drains, the gRPC server's stop
    within its grace, the cleanups, then exit status 0. An orchestrator needs no other server to
    start (its Triton is simply not ready)."""
    status, output = sigterm_once_logged(
        "orchestrator",
        {
            "TENSORWAY_ORCHESTRATOR_TRITONS": '["127.0.0.1:1"]',
            "TENSORWAY_ORCHESTRATOR_METRICS_ENABLED": "false",
        },
        '"serving"',
    )
    assert status == 0, output
    assert '"message": "stopped"' in output, output
    assert "Traceback" not in output, output


def test_a_service_given_sigterm_while_it_is_still_starting_ends_its_start_and_exits_0() -> None:
    """A SIGTERM while `create` still waits (here a router for its first route table, from a
    registry nobody serves) cancels the start: exit status 0 and the log says so, where the
    signal used to kill the process outright (status -15, nothing cleaned up)."""
    status, output = sigterm_once_logged(
        "router",
        {
            "TENSORWAY_ROUTER_REGISTRY_ADDRESS": "127.0.0.1:1",
            "TENSORWAY_ROUTER_INITIAL_ROUTES_TIMEOUT": "PT10M",
            "TENSORWAY_ROUTER_METRICS_ENABLED": "false",
        },
        # The route watcher has tried the registry: `create` is waiting for the first table.
        "route stream lost",
    )
    assert status == 0, output
    assert '"message": "stopped before it started serving"' in output, output
    assert "listening on" not in output, output
    assert "Traceback" not in output, output


async def test_reflection_lists_services_through_grpcurl(probe: tuple[ServiceServer, str]) -> None:
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert grpcurl is not None, "grpcurl comes with the local extra"
    process = await asyncio.create_subprocess_exec(
        grpcurl, "-plaintext", probe[1], "list", stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0
    listed = stdout.decode().split()
    assert SERVICE.full_name in listed
    assert "grpc.health.v1.Health" in listed


async def test_metrics_count_calls_by_method_and_code(
    probe: tuple[ServiceServer, str], stub: pb_grpc.InferenceServiceStub
) -> None:
    await stub.Infer(pb.InferRequest(model_name="echo"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Infer(pb.InferRequest(model_name="unknown"))
    url = f"http://127.0.0.1:{probe[0].metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    infer = {"grpc_service": SERVICE.full_name, "grpc_method": "Infer"}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted({**infer, **labels}.items()))))

    assert (value("tensorway_grpc_server_handled_total", grpc_code="OK") or 0) >= 1
    assert (value("tensorway_grpc_server_handled_total", grpc_code="NOT_FOUND") or 0) >= 1
    assert (value("tensorway_grpc_server_handling_seconds_count", grpc_code="OK") or 0) >= 1
    assert value("tensorway_grpc_server_in_flight") == 0


async def test_binding_a_taken_port_fails_clearly(probe: tuple[ServiceServer, str]) -> None:
    taken = int(probe[1].rsplit(":", 1)[1])
    with pytest.raises(OSError, match="address in use"):
        create_server("probe", ServiceSettings(port=taken), [])
