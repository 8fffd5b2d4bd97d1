"""The stateful demo model `accumulate` (sequence batching) through the router: several sequences
interleaved on one `tritonclient.grpc` stream get the same answers as from Triton directly."""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service

from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tests.router.conftest import MeshFactory, specs

MODEL = "accumulate"
# Sequence id → its inputs; the sequences interleave one request at a time.
SEQUENCES = {101: [1, 2, 3, 4], 102: [10, -20, 30], 103: [7], 104: [5, 5, 5, 5, 5]}


def interleaved() -> list[tuple[int, int, bool, bool]]:
    """(sequence id, value, start, end) for every request, round-robin over the sequences."""
    steps = []
    for position in range(max(len(values) for values in SEQUENCES.values())):
        for sequence, values in SEQUENCES.items():
            if position < len(values):
                steps.append((sequence, values[position], position == 0, position == len(values) - 1))
    return steps


def run_sequences(address: str) -> list[tuple[str, int, Any]]:
    """Every request on one stream; (request id, running sum, error) for each answer, in the order
    they came."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with grpcclient.InferenceServerClient(address) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        steps = interleaved()
        for index, (sequence, value, start, end) in enumerate(steps):
            tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
            client.async_stream_infer(
                MODEL,
                [tensor],
                request_id=f"{sequence}-{index}",
                sequence_id=sequence,
                sequence_start=start,
                sequence_end=end,
            )
        got = [answers.get(timeout=30) for _ in steps]
        client.stop_stream()
    return [
        (result.get_response().id, int(result.as_numpy("OUTPUT")[0, 0]), None)
        if error is None
        else ("", 0, str(error.message()))
        for result, error in got
    ]


async def accumulate_route(triton_address: str, endpoints: list[str]) -> registry_pb.Route:
    async with grpc.aio.insecure_channel(triton_address) as channel:
        metadata = await triton_service.GRPCInferenceServiceStub(channel).ModelMetadata(
            triton.ModelMetadataRequest(name=MODEL)
        )
    route = registry_pb.Route(model=MODEL)
    route.versions.add(
        version="1",
        weight=100,
        pool="pools/test",
        endpoints=endpoints,
        platform=metadata.platform,
        max_batch_size=8,
        inputs=specs(metadata.inputs, 1),
        outputs=specs(metadata.outputs, 1),
    )
    return route


async def test_interleaved_sequences_on_one_stream_answer_as_triton_does(
    mesh: MeshFactory, triton_grpc: str
) -> None:
    route = await accumulate_route(triton_grpc, [])
    # Two orchestrators: each sequence stays on the one its START went to.
    running = await mesh(
        real=True, orchestrators=2, routes=lambda endpoints: [with_endpoints(route, endpoints)]
    )
    direct = await asyncio.to_thread(run_sequences, triton_grpc)
    routed = await asyncio.to_thread(run_sequences, running.router.address)
    assert routed == direct
    # The running sums themselves, in request order.
    sums = {sequence: list(np.cumsum(values)) for sequence, values in SEQUENCES.items()}
    expected = [sums[sequence].pop(0) for sequence, _, _, _ in interleaved()]
    assert [total for _, total, _ in routed] == expected
    assert all(error is None for _, _, error in routed)


def with_endpoints(route: registry_pb.Route, endpoints: list[str]) -> registry_pb.Route:
    placed = registry_pb.Route()
    placed.CopyFrom(route)
    placed.versions[0].endpoints.extend(endpoints)
    return placed
