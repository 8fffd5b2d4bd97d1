"""Triton's own clients pointed at the router work unchanged: sync, async (callback), asyncio and
streaming, for every demo model, with the same answers Triton gives directly."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.router.conftest import DEMO_MODELS, MeshFactory

Array = npt.NDArray[Any]
Answers = dict[str, dict[str, Array]]


def demo_inputs(model: str) -> dict[str, Array]:
    rng = np.random.default_rng(7)
    if model in ("simple", "simple_string"):
        a = np.arange(32, dtype=np.int32).reshape(2, 16)
        b = np.array([[1] * 16, [-7] * 16], dtype=np.int32)
        if model == "simple":
            return {"INPUT0": a, "INPUT1": b}
        as_text = np.vectorize(lambda v: str(v).encode(), otypes=[np.object_])
        return {"INPUT0": as_text(a), "INPUT1": as_text(b)}
    width = 64 if model == "digits" else 4
    return {"input": (rng.random((5, width)) * 8).astype(np.float32)}


def triton_inputs(arrays: dict[str, Array]) -> list[grpcclient.InferInput]:
    """Inputs for any tritonclient.grpc client, asyncio included."""
    tensors = []
    for name, array in arrays.items():
        datatype = "BYTES" if array.dtype == np.object_ else grpcclient.np_to_triton_dtype(array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def outputs_of(result: Any, names: list[str]) -> dict[str, Array]:
    return {name: result.as_numpy(name) for name in names}


OUTPUTS = {
    "simple": ["OUTPUT0", "OUTPUT1"],
    "simple_string": ["OUTPUT0", "OUTPUT1"],
    "digits": ["label", "probabilities"],
    "iris": ["label", "probabilities"],
}


@pytest.fixture(scope="module")
def direct_answers(triton_grpc: str) -> Answers:
    """What Triton itself answers for each model's inputs."""
    with grpcclient.InferenceServerClient(triton_grpc) as client:
        return {
            model: outputs_of(client.infer(model, triton_inputs(demo_inputs(model))), OUTPUTS[model])
            for model in DEMO_MODELS
        }


def assert_same(answer: dict[str, Array], expected: dict[str, Array]) -> None:
    assert answer.keys() == expected.keys()
    for name, array in expected.items():
        assert answer[name].dtype == array.dtype
        np.testing.assert_array_equal(answer[name], array)


def in_thread(call: Callable[[], Any]) -> Any:
    # The router runs on this test's event loop: a blocking client must not block it.
    return asyncio.to_thread(call)


@pytest.mark.parametrize("model", DEMO_MODELS)
async def test_sync_client(mesh: MeshFactory, model: str, direct_answers: Answers) -> None:
    running = await mesh(real=True)

    def call() -> dict[str, Array]:
        with grpcclient.InferenceServerClient(running.router.address) as client:
            result = client.infer(model, triton_inputs(demo_inputs(model)), request_id="r-1")
            assert result.get_response().id == "r-1"
            return outputs_of(result, OUTPUTS[model])

    assert_same(await in_thread(call), direct_answers[model])


@pytest.mark.parametrize("model", DEMO_MODELS)
async def test_async_callback_client(mesh: MeshFactory, model: str, direct_answers: Answers) -> None:
    running = await mesh(real=True)

    def call() -> dict[str, Array]:
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        with grpcclient.InferenceServerClient(running.router.address) as client:
            client.async_infer(
                model,
                triton_inputs(demo_inputs(model)),
                callback=lambda result, error: answers.put((result, error)),
                outputs=[grpcclient.InferRequestedOutput(name) for name in OUTPUTS[model]],
            )
            result, error = answers.get(timeout=30)
        assert error is None
        return outputs_of(result, OUTPUTS[model])

    assert_same(await in_thread(call), direct_answers[model])


@pytest.mark.parametrize("model", DEMO_MODELS)
async def test_asyncio_client(mesh: MeshFactory, model: str, direct_answers: Answers) -> None:
    running = await mesh(real=True)
    async with aioclient.InferenceServerClient(running.router.address) as client:
        assert await client.is_server_ready()
        assert await client.is_model_ready(model)
        result = await client.infer(model, triton_inputs(demo_inputs(model)))
    assert_same(outputs_of(result, OUTPUTS[model]), direct_answers[model])


async def test_streaming_client_gets_every_answer_and_errors_on_the_stream(
    mesh: MeshFactory, direct_answers: Answers
) -> None:
    running = await mesh(real=True)

    def call() -> dict[str, tuple[Any, Any]]:
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        with grpcclient.InferenceServerClient(running.router.address) as client:
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for model in DEMO_MODELS:
                client.async_stream_infer(model, triton_inputs(demo_inputs(model)), request_id=model)
            client.async_stream_infer(
                "no-such-model", triton_inputs(demo_inputs("simple")), request_id="unknown"
            )
            got = [answers.get(timeout=30) for _ in range(len(DEMO_MODELS) + 1)]
            client.stop_stream()
        by_id = {}
        for result, error in got:
            if error is not None:
                by_id["unknown"] = (None, error)
            else:
                by_id[result.get_response().id] = (result, None)
        return by_id

    answers = await in_thread(call)
    for model in DEMO_MODELS:
        result, _ = answers[model]
        assert_same(outputs_of(result, OUTPUTS[model]), direct_answers[model])
    _, error = answers["unknown"]
    assert isinstance(error, InferenceServerException)
    assert "no-such-model" in str(error.message())


async def test_metadata_config_and_repository_index(mesh: MeshFactory, triton_grpc: str) -> None:
    running = await mesh(real=True)
    async with (
        aioclient.InferenceServerClient(running.router.address) as routed,
        aioclient.InferenceServerClient(triton_grpc) as direct,
    ):
        for model in DEMO_MODELS:
            ours, theirs = await routed.get_model_metadata(model), await direct.get_model_metadata(model)
            assert (ours.name, list(ours.versions), ours.platform) == (model, ["1"], theirs.platform)
            assert list(ours.inputs) == list(theirs.inputs)
            assert list(ours.outputs) == list(theirs.outputs)
            # A serving Triton's own configuration, verbatim.
            assert await routed.get_model_config(model) == await direct.get_model_config(model)
        index = await routed.get_model_repository_index()
        assert sorted((m.name, m.version, m.state) for m in index.models) == [
            (model, "1", "READY") for model in sorted(DEMO_MODELS)
        ]
        ours, theirs = await routed.get_server_metadata(), await direct.get_server_metadata()
        assert (ours.name, ours.version) == (theirs.name, theirs.version)
        assert await routed.is_server_live()


async def test_unknown_model_is_not_found_as_triton_says(mesh: MeshFactory) -> None:
    running = await mesh(real=True)
    async with aioclient.InferenceServerClient(running.router.address) as client:
        assert not await client.is_model_ready("no-such-model")
        for call in (
            client.get_model_metadata("no-such-model"),
            client.infer("no-such-model", triton_inputs(demo_inputs("simple"))),
        ):
            with pytest.raises(InferenceServerException) as raised:
                await call
            assert raised.value.status() == str(grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize(
    ("shape", "datatype", "violation"),
    [([2, 15], "INT32", "[2, 15]"), ([2, 16], "FP32", "FP32")],
)
async def test_wrong_shape_or_datatype_is_invalid_and_never_reaches_triton(
    mesh: MeshFactory, triton_grpc: str, shape: list[int], datatype: str, violation: str
) -> None:
    running = await mesh(real=True)
    bad = grpcclient.InferInput("INPUT0", shape, datatype)
    bad.set_data_from_numpy(np.zeros(shape, dtype=np.int32 if datatype == "INT32" else np.float32))
    good = triton_inputs({"INPUT1": np.zeros((2, 16), dtype=np.int32)})
    async with (
        aioclient.InferenceServerClient(running.router.address) as routed,
        aioclient.InferenceServerClient(triton_grpc) as direct,
    ):
        before = (await direct.get_inference_statistics("simple")).model_stats[0].inference_stats
        with pytest.raises(InferenceServerException) as raised:
            await routed.infer("simple", [bad, *good])
        after = (await direct.get_inference_statistics("simple")).model_stats[0].inference_stats
    assert raised.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert "INPUT0" in str(raised.value.message())
    assert violation in str(raised.value.message())
    assert (after.success.count, after.fail.count) == (before.success.count, before.fail.count)
