"""The orchestrator serves Triton's control RPCs to routers: a model's configuration verbatim,
statistics per Triton (named in trailing metadata), and the pool's repository index."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service

from tensorway.orchestrator.triton_control import TRITONS_METADATA_KEY
from tests.orchestrator.conftest import StartOrchestrator, TcpProxy


async def test_model_config_is_tritons_own(orchestrator: str, triton_stub: Any) -> None:
    async with grpc.aio.insecure_channel(orchestrator) as channel:
        ours = triton_service.GRPCInferenceServiceStub(channel)
        for model in ("simple", "digits", "accumulate"):
            for version in ("", "1"):
                request = triton.ModelConfigRequest(name=model, version=version)
                assert await ours.ModelConfig(request) == await triton_stub.ModelConfig(request)


@pytest.mark.parametrize(("name", "version"), [("no-such-model", ""), ("simple", "2"), ("simple", "abc")])
async def test_model_config_refusals_keep_tritons_codes(
    orchestrator: str, triton_stub: Any, name: str, version: str
) -> None:
    request = triton.ModelConfigRequest(name=name, version=version)
    with pytest.raises(grpc.aio.AioRpcError) as direct:
        await triton_stub.ModelConfig(request)
    async with grpc.aio.insecure_channel(orchestrator) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as ours:
            await triton_service.GRPCInferenceServiceStub(channel).ModelConfig(request)
    assert ours.value.code() == direct.value.code()
    assert "request id" not in (ours.value.details() or "")


async def test_statistics_come_per_triton_with_the_tritons_named(
    start_orchestrator: StartOrchestrator, triton_grpc: str, triton_proxy: TcpProxy, triton_stub: Any
) -> None:
    # Two addresses of one Triton: a pool of two Tritons whose statistics are known.
    address = await start_orchestrator(triton_grpc, triton_proxy.address)
    request = triton.ModelStatisticsRequest(name="simple", version="1")
    async with grpc.aio.insecure_channel(address) as channel:
        call = triton_service.GRPCInferenceServiceStub(channel).ModelStatistics(request)
        answer = await call
        trailing = dict(await call.trailing_metadata() or ())
    direct = await triton_stub.ModelStatistics(request)
    assert trailing[TRITONS_METADATA_KEY].split(",") == [triton_grpc, triton_proxy.address]
    assert list(answer.model_stats) == [direct.model_stats[0], direct.model_stats[0]]


async def test_statistics_of_a_model_no_triton_has_are_invalid_as_triton_says(
    orchestrator: str, triton_stub: Any
) -> None:
    request = triton.ModelStatisticsRequest(name="no-such-model")
    with pytest.raises(grpc.aio.AioRpcError) as direct:
        await triton_stub.ModelStatistics(request)
    async with grpc.aio.insecure_channel(orchestrator) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as ours:
            await triton_service.GRPCInferenceServiceStub(channel).ModelStatistics(request)
    assert ours.value.code() == direct.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_repository_index_is_the_pools(
    start_orchestrator: StartOrchestrator, triton_grpc: str, triton_proxy: TcpProxy, triton_stub: Any
) -> None:
    address = await start_orchestrator(triton_grpc, triton_proxy.address)
    async with grpc.aio.insecure_channel(address) as channel:
        ours = triton_service.GRPCInferenceServiceStub(channel)
        for ready in (False, True):
            request = triton.RepositoryIndexRequest(ready=ready)
            # Each model once, though both Tritons of the pool report it.
            assert await ours.RepositoryIndex(request) == await triton_stub.RepositoryIndex(request)
