"""Triton requests cross the router as the bytes they arrived as: an orchestrator fake that
records what reaches it sees the client's message unchanged (the chosen version appended when the
client named none), for unary calls and for every message of a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as triton

from tensorway.ratelimit.leases import RequestCost
from tensorway.router.serialized import TRITON, SerializedRequest
from tensorway.tensors import wire
from tests.router.conftest import MeshFactory

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


def simple_request(version: str = "", request_id: str = "r", rows: int = 1) -> Any:
    request = triton.ModelInferRequest(model_name="simple", model_version=version, id=request_id)
    request.parameters["priority"].int64_param = 1
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[rows, 16])
        request.raw_input_contents.append(np.arange(16 * rows, dtype=np.int32).tobytes())
    request.outputs.add(name="OUTPUT0")
    return request


async def test_a_unary_request_reaches_the_orchestrator_as_the_client_sent_it(mesh: MeshFactory) -> None:
    running = await mesh()
    orchestrator = running.orchestrators[0]
    named, unnamed = simple_request("1").SerializeToString(), simple_request("").SerializeToString()
    async with grpc.aio.insecure_channel(running.router.address) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        answers = [triton.ModelInferResponse.FromString(await infer(sent)) for sent in (named, unnamed)]
    assert orchestrator.received[0] == named
    # The version the router chose, appended: the client's bytes are all still there, in front.
    assert orchestrator.received[1] == unnamed + wire.string_field(2, "1")
    assert triton.ModelInferRequest.FromString(orchestrator.received[1]).model_version == "1"
    # The orchestrator's answer comes back as it was sent.
    assert [answer.id for answer in answers] == ["r", "r"]
    assert all(answer.outputs[0].name == "OUTPUT0" for answer in answers)


async def test_each_message_of_a_stream_reaches_the_orchestrator_as_sent(mesh: MeshFactory) -> None:
    running = await mesh()
    orchestrator = running.orchestrators[0]
    sent = [simple_request("1", request_id=str(index)).SerializeToString() for index in range(5)]

    async def requests() -> AsyncIterator[bytes]:
        for message in sent:
            yield message

    async with grpc.aio.insecure_channel(running.router.address) as channel:
        stream = channel.stream_stream(MODEL_STREAM_INFER)
        answers = [triton.ModelStreamInferResponse.FromString(answer) async for answer in stream(requests())]
    # Requests of no sequence run concurrently, so they may arrive in any order.
    assert sorted(orchestrator.received) == sorted(sent)
    assert [answer.infer_response.id for answer in answers] == [str(index) for index in range(5)]
    # Triton's flag on stream answers, added on the wire.
    assert all(answer.infer_response.parameters["triton_final_response"].bool_param for answer in answers)


def test_what_routing_and_limits_read_of_a_triton_request_agrees_with_a_parse() -> None:
    request = simple_request(" 1", request_id="x-9", rows=3)
    request.parameters["sequence_id"].uint64_param = 42
    request.parameters["sequence_start"].bool_param = True
    data = request.SerializeToString()
    read = SerializedRequest.parse_triton(data)
    assert (read.model, read.version, read.id, read.api) == ("simple", " 1", "x-9", TRITON)
    assert read.sequence is not None
    assert (read.sequence.id, read.sequence.start, read.sequence.end) == ("42", True, False)
    amended = read.with_version("1")
    assert amended.data[: len(data)] == data
    assert triton.ModelInferRequest.FromString(amended.data).model_version == "1"
    # Rows from the inputs' shapes (field 5 of Triton's request), bytes the serialized length.
    assert RequestCost.of(data, TRITON.inputs_field) == RequestCost(3, len(data))
