"""Triton's ModelInfer served by the orchestrator itself, as routers forward Triton clients'
requests to it: the answer is Triton's, the caller's id kept and nothing added, and requests that
do not fit the model are refused with the codes Triton gives, before Triton sees them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service


def simple_request(**changes: Callable[[Any], Any]) -> Any:
    """`simple` with two INT32 [1, 16] inputs in raw contents, then each change applied."""
    request = triton.ModelInferRequest(model_name="simple", id="caller-7")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    for change in changes.values():
        change(request)
    return request


def typed(request: Any) -> None:
    request.ClearField("raw_input_contents")
    for tensor in request.inputs:
        tensor.contents.int_contents.extend(range(16))


def shared_memory(tensor: Any, region: str, byte_size: int | None = None) -> None:
    tensor.parameters["shared_memory_region"].string_param = region
    if byte_size is not None:
        tensor.parameters["shared_memory_byte_size"].int64_param = byte_size


@pytest.fixture(scope="module")
async def orchestrator_triton(orchestrator: str) -> AsyncIterator[Any]:
    """The orchestrator's own GRPCInferenceService."""
    async with grpc.aio.insecure_channel(orchestrator) as channel:
        yield triton_service.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize(
    "change",
    [lambda r: None, typed, lambda r: r.raw_input_contents.append(b"\0" * 64)],
    ids=["raw", "typed", "raw-extra-ignored-as-triton-does"],
)
async def test_answers_are_tritons_with_the_callers_id_and_nothing_added(
    orchestrator_triton: Any, triton_stub: Any, change: Callable[[Any], Any]
) -> None:
    ours = await orchestrator_triton.ModelInfer(simple_request(change=change))
    theirs = await triton_stub.ModelInfer(simple_request(change=change))
    assert ours.id == theirs.id == "caller-7"
    assert dict(ours.parameters) == dict(theirs.parameters) == {}
    assert list(ours.outputs) == list(theirs.outputs)
    assert list(ours.raw_output_contents) == list(theirs.raw_output_contents)


REFUSED = {
    "mixed": lambda r: r.inputs[0].contents.int_contents.extend(range(16)),
    "typed-short": lambda r: (
        r.ClearField("raw_input_contents"),
        r.inputs[0].contents.int_contents.extend(range(15)),
    ),
    "raw-short": lambda r: r.raw_input_contents.__setitem__(0, b"abc"),
    "raw-missing": lambda r: r.raw_input_contents.pop(),
    "datatype": lambda r: setattr(r.inputs[0], "datatype", "FP32"),
    "shape": lambda r: r.inputs[0].shape.__setitem__(1, 15),
    "unknown-input": lambda r: setattr(r.inputs[1], "name", "INPUT9"),
    "unknown-output": lambda r: r.outputs.add(name="OUTPUT9"),
    "shm-inputs": lambda r: (
        r.ClearField("raw_input_contents"),
        [shared_memory(tensor, "x", 64) for tensor in r.inputs],
    ),
    "shm-without-size": lambda r: (
        r.ClearField("raw_input_contents"),
        [shared_memory(t, "x") for t in r.inputs],
    ),
    "shm-size-alone": lambda r: (
        r.inputs[0].parameters["shared_memory_byte_size"].__setattr__("int64_param", 64)
    ),
    "unknown-model": lambda r: setattr(r, "model_name", "no-such-model"),
}


@pytest.mark.parametrize("change", REFUSED.values(), ids=REFUSED.keys())
async def test_requests_that_do_not_fit_are_refused_with_tritons_codes(
    orchestrator_triton: Any,
    triton_stub: Any,
    inference_count: Callable[[str], Awaitable[int]],
    change: Callable[[Any], Any],
) -> None:
    codes = []
    before = await inference_count("simple")
    for stub in (orchestrator_triton, triton_stub):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(simple_request(change=change))
        codes.append(refused.value.code())
        if stub is orchestrator_triton:
            # Refused before Triton saw it, in the mesh's words: no id the client never sent.
            assert await inference_count("simple") == before
            assert "request id" not in (refused.value.details() or "")
    assert codes[0] == codes[1]
