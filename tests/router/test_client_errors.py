"""One tenant's malformed requests cost another tenant nothing: through the router and tensorway's
own orchestrator in front of the real Triton, tenant B floods a pool with bad BYTES tensors while
tenant A's steady traffic to the same pool all succeeds and no breaker opens."""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
from prometheus_client import REGISTRY

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.router.conftest import MeshFactory

TENANT_A = (("x-tenant-id", "tenant-a"),)
TENANT_B = (("x-tenant-id", "tenant-b"),)
MALFORMED_REQUESTS = 1000
B_CONCURRENCY = 32
A_CONCURRENCY = 2


def pack(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def strings(raw0: bytes) -> pb.InferRequest:
    decimals = pack([b"1"] * 16)
    return pb.InferRequest(
        model_name="simple_string",
        inputs=[
            tensor_pb2.Tensor(name="INPUT0", datatype="BYTES", shape=[1, 16], raw_contents=raw0),
            tensor_pb2.Tensor(name="INPUT1", datatype="BYTES", shape=[1, 16], raw_contents=decimals),
        ],
    )


def malformed() -> Iterator[pb.InferRequest]:
    """Bad BYTES tensors of each kind, in turn: the orchestrator refuses the first three itself; the
    model refuses the last one in Triton."""
    return itertools.cycle(
        [
            strings(pack([b"1"] * 15)),  # element count wrong
            strings(pack([b"1"] * 15) + struct.pack("<I", 50) + b"1"),  # length past the end
            strings(pack([b"1"] * 16) + b"\x01\x00"),  # cut length prefix
            strings(pack([b"abc"] * 16)),  # not decimal: model.py raises
        ]
    )


def simple_request() -> pb.InferRequest:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    return pb.InferRequest(
        model_name="simple",
        inputs=[
            tensor_pb2.Tensor(name="INPUT0", datatype="INT32", shape=[1, 16], raw_contents=a.tobytes()),
            tensor_pb2.Tensor(name="INPUT1", datatype="INT32", shape=[1, 16], raw_contents=a.tobytes()),
        ],
    )


async def test_a_flood_of_malformed_requests_fails_none_of_another_tenants(mesh: MeshFactory) -> None:
    running = await mesh(real=True)
    (endpoint,) = running.endpoints
    trips_before = (
        REGISTRY.get_sample_value("tensorway_router_breaker_trips_total", {"endpoint": endpoint}) or 0
    )
    async with grpc.aio.insecure_channel(running.router.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        flood_over = asyncio.Event()
        a_answers: Counter[str] = Counter()
        b_answers: Counter[str] = Counter()
        b_messages: set[str] = set()

        async def tenant_a() -> None:
            while not flood_over.is_set():
                try:
                    await stub.Infer(simple_request(), metadata=TENANT_A, timeout=10)
                    a_answers["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    a_answers[error.code().name] += 1

        async def tenant_b(requests: Iterator[pb.InferRequest]) -> None:
            for request in requests:
                try:
                    await stub.Infer(request, metadata=TENANT_B, timeout=10)
                    b_answers["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    b_answers[error.code().name] += 1
                    b_messages.add(error.details() or "")

        # A is under way before the flood starts and keeps going until it ends.
        await stub.Infer(simple_request(), metadata=TENANT_A)
        steady = [asyncio.ensure_future(tenant_a()) for _ in range(A_CONCURRENCY)]
        try:
            shared = itertools.islice(malformed(), MALFORMED_REQUESTS)
            await asyncio.gather(*(tenant_b(shared) for _ in range(B_CONCURRENCY)))
        finally:
            flood_over.set()
            await asyncio.gather(*steady)

    assert b_answers == {"INVALID_ARGUMENT": MALFORMED_REQUESTS}
    assert all(message.startswith("request does not fit model 'simple_string': ") for message in b_messages)
    assert not any("request id" in message for message in b_messages)
    assert set(a_answers) == {"OK"}
    assert a_answers["OK"] > 0
    trips = REGISTRY.get_sample_value("tensorway_router_breaker_trips_total", {"endpoint": endpoint})
    assert (trips or 0) == trips_before
    assert REGISTRY.get_sample_value("tensorway_router_breaker_open", {"endpoint": endpoint}) == 0
