"""The decoupled demo model `tokens` through the orchestrator: Triton's streaming client gets the
same series of answers (values, order, final flags, the empty final answer when asked for) as from
Triton itself, a unary ModelInfer is refused with Triton's code and words, and the tensorway API
streams the series on InferStream."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service

from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.demo_models.tokens import MODEL, token_series

PROMPTS = [b"one two three", b"  ", b"\xff\xfe", "pi\u00f1ata fiesta".encode()]


@pytest.mark.parametrize("empty_final", [False, True])
async def test_every_answer_of_a_decoupled_model_comes_as_from_triton(
    orchestrator: str, triton_grpc: str, empty_final: bool
) -> None:
    for prompt in PROMPTS:
        direct = await asyncio.to_thread(token_series, triton_grpc, prompt, empty_final=empty_final)
        through = await asyncio.to_thread(token_series, orchestrator, prompt, empty_final=empty_final)
        assert through == direct, prompt
    assert direct[-1][-1] is empty_final  # the last prompt's series ended with the final flag


async def test_unary_infer_on_a_decoupled_model_is_refused_as_triton_refuses_it(
    orchestrator: str, triton_stub: Any
) -> None:
    request = tokens_request()
    async with grpc.aio.insecure_channel(orchestrator) as channel:
        through = await unary_outcome(triton_service.GRPCInferenceServiceStub(channel), request)
    direct = await unary_outcome(triton_stub, request)
    assert through == direct
    assert direct[0] == grpc.StatusCode.UNIMPLEMENTED


async def test_infer_stream_streams_the_series_and_unary_infer_refuses(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    request = pb.InferRequest(model_name=MODEL, id="t1")
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a b c")
    answers = [answer.response async for answer in stub.InferStream(pb.InferStreamRequest(request=request))]
    got = [
        (a.id, list(a.outputs[0].contents.bytes_contents) if a.outputs else None, final(a)) for a in answers
    ]
    assert got == [("t1", [b"a"], False), ("t1", [b"b"], False), ("t1", [b"c"], False), ("t1", None, True)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Infer(request)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def final(answer: pb.InferResponse) -> bool:
    return bool(answer.parameters["triton_final_response"].bool_value)


async def unary_outcome(stub: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    """The code and message of a unary ModelInfer's refusal."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ModelInfer(request)
    return refused.value.code(), refused.value.details() or ""


def tokens_request() -> Any:
    request = triton.ModelInferRequest(model_name=MODEL, id="u1")
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")
    return request
