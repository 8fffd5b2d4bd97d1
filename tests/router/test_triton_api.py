"""The whole of Triton's gRPC API through the router, answered as Triton answers: each test asks
the router and the Triton behind it the same thing with Triton's own client library and
compares the answers and the status codes."""

from __future__ import annotations

import asyncio
import base64
import queue
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service
from tritonclient.utils import InferenceServerException

from tensorway.router.triton_api import EXTENSIONS
from tensorway.runtime.context import ADMIN_SCOPES, TENANT_SCOPES, identity_metadata
from tests.ports import free_port
from tests.router.conftest import DEMO_MODELS, MeshFactory, RouteFactory
from tests.router.test_triton_clients import demo_inputs, triton_inputs

ADMIN = dict(identity_metadata("ops", ADMIN_SCOPES))
TENANT = dict(identity_metadata("acme", TENANT_SCOPES))


async def outcome(call: Awaitable[Any]) -> Any:
    """The answer, or the status code of the refusal."""
    try:
        return await call
    except InferenceServerException as error:
        return error.status()
    except grpc.aio.AioRpcError as error:
        return str(error.code())


def simple_request(version: str = "", **changes: Any) -> Any:
    """A raw Triton ModelInferRequest for `simple`, two INT32 [1, 16] inputs in raw contents."""
    request = triton.ModelInferRequest(model_name="simple", model_version=version, id="r")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    for change in changes.values():
        change(request)
    return request


def shared_memory(tensor: Any, region: str, byte_size: int | None = None) -> None:
    tensor.parameters["shared_memory_region"].string_param = region
    if byte_size is not None:
        tensor.parameters["shared_memory_byte_size"].int64_param = byte_size


def in_thread(call: Callable[[], Any]) -> Any:
    # The router runs on this test's event loop: a blocking client must not block it.
    return asyncio.to_thread(call)


async def test_statistics_after_inferring_are_tritons_with_each_triton_counted_once(
    mesh: MeshFactory, triton_grpc: str
) -> None:
    # Two orchestrators in front of one Triton: the router hears its statistics twice.
    running = await mesh(real=True, orchestrators=2)

    def infer_then_print_statistics(address: str) -> Any:
        # What a very ordinary tritonclient script does.
        with grpcclient.InferenceServerClient(address) as client:
            for _ in range(3):
                client.infer("simple", triton_inputs(demo_inputs("simple")))
            return client.get_inference_statistics("simple")

    routed = await in_thread(lambda: infer_then_print_statistics(running.router.address))
    async with (
        aioclient.InferenceServerClient(running.router.address) as ours,
        aioclient.InferenceServerClient(triton_grpc) as theirs,
    ):
        direct = await theirs.get_inference_statistics("simple")
        assert routed == direct
        assert routed.model_stats[0].inference_stats.success.count >= 3
        assert await ours.get_inference_statistics("simple", "1") == await theirs.get_inference_statistics(
            "simple", "1"
        )
        everything = {(s.name, s.version): s for s in (await theirs.get_inference_statistics()).model_stats}
        assert list((await ours.get_inference_statistics()).model_stats) == [
            everything[(model, "1")] for model in sorted(DEMO_MODELS)
        ]
        for name, version in (("no-such-model", ""), ("simple", "2"), ("simple", "abc"), ("simple", "-1")):
            assert await outcome(ours.get_inference_statistics(name, version)) == await outcome(
                theirs.get_inference_statistics(name, version)
            )


async def test_server_metadata_and_model_config_are_tritons(mesh: MeshFactory, triton_grpc: str) -> None:
    running = await mesh(real=True)
    async with (
        aioclient.InferenceServerClient(running.router.address) as ours,
        aioclient.InferenceServerClient(triton_grpc) as theirs,
    ):
        server, triton_server = await ours.get_server_metadata(), await theirs.get_server_metadata()
        assert (
            (server.name, server.version)
            == (triton_server.name, triton_server.version)
            == ("triton", "2.51.0")
        )
        assert list(server.extensions) == list(EXTENSIONS)
        assert set(server.extensions) <= set(triton_server.extensions)
        for model in DEMO_MODELS:
            for version in ("", "1"):
                # Verbatim: backend, instance groups, batching, parameters and version policy too.
                assert await ours.get_model_config(model, version) == await theirs.get_model_config(
                    model, version
                )


def ask(client: aioclient.InferenceServerClient, method: str, model: str, version: str) -> Awaitable[Any]:
    if method == "infer":
        return client.infer(model, triton_inputs(demo_inputs("simple")), model_version=version)
    return getattr(client, method)(model, version)  # type: ignore[no-any-return]


async def test_version_strings_get_tritons_answers_and_codes(mesh: MeshFactory, triton_grpc: str) -> None:
    running = await mesh(real=True)
    async with (
        aioclient.InferenceServerClient(running.router.address) as ours,
        aioclient.InferenceServerClient(triton_grpc) as theirs,
    ):
        for version in ("1", "01", " 1", "2", "0", "abc", "-1", "99999999999999999999"):
            for model in ("simple", "no-such-model"):
                for method in ("get_model_metadata", "get_model_config", "is_model_ready", "infer"):
                    mine = await outcome(ask(ours, method, model, version))
                    direct = await outcome(ask(theirs, method, model, version))
                    if isinstance(direct, aioclient.InferResult):
                        np.testing.assert_array_equal(mine.as_numpy("OUTPUT0"), direct.as_numpy("OUTPUT0"))
                    elif isinstance(direct, str | bool):
                        assert (method, version, model, mine) == (method, version, model, direct)
                    else:
                        assert type(mine) is type(direct), (method, version, model, mine)


@pytest.mark.parametrize(
    "change",
    [
        # Raw and typed contents mixed.
        lambda r: r.inputs[0].contents.int_contents.extend(range(16)),
        # Typed contents one value short.
        lambda r: (r.ClearField("raw_input_contents"), r.inputs[0].contents.int_contents.extend(range(15))),
        # A raw input three bytes long.
        lambda r: r.raw_input_contents.__setitem__(0, b"abc"),
        # One raw input missing.
        lambda r: r.raw_input_contents.pop(),
        # An input of the wrong datatype.
        lambda r: setattr(r.inputs[0], "datatype", "FP32"),
        # An input in a shared-memory region, beside raw contents.
        lambda r: shared_memory(r.inputs[1], "region", 64),
        # Inputs in a region nobody registered.
        lambda r: (
            r.ClearField("raw_input_contents"),
            [shared_memory(tensor, "x", 64) for tensor in r.inputs],
        ),
        # Without the region's size.
        lambda r: (r.ClearField("raw_input_contents"), [shared_memory(tensor, "x") for tensor in r.inputs]),
        # A size without a region.
        lambda r: r.inputs[0].parameters["shared_memory_byte_size"].__setattr__("int64_param", 64),
        # An output into a region nobody registered.
        lambda r: shared_memory(r.outputs.add(name="OUTPUT0"), "x", 64),
    ],
    ids=[
        "mixed",
        "typed-short",
        "raw-short",
        "raw-missing",
        "datatype",
        "shm-and-raw",
        "shm-inputs",
        "shm-without-size",
        "shm-size-alone",
        "shm-output",
    ],
)
async def test_contents_that_do_not_fit_get_tritons_codes(
    mesh: MeshFactory, triton_grpc: str, change: Callable[[Any], Any]
) -> None:
    running = await mesh(real=True)
    codes = []
    for address in (running.router.address, triton_grpc):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = triton_service.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(simple_request(change=change))
            codes.append(refused.value.code())
            if address == running.router.address:
                # The mesh's own words: no backend text, no request id the client never sent.
                assert "request id" not in (refused.value.details() or "")
    assert codes[0] == codes[1]


async def test_answers_carry_only_the_parameters_triton_sends(mesh: MeshFactory, triton_grpc: str) -> None:
    running = await mesh(real=True)

    def parameters(address: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with grpcclient.InferenceServerClient(address) as client:
            unary = dict(
                client.infer("simple", triton_inputs(demo_inputs("simple"))).get_response().parameters
            )
            answers: queue.Queue[Any] = queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put(result or error))
            for index in range(2):
                client.async_stream_infer(
                    "simple", triton_inputs(demo_inputs("simple")), request_id=str(index)
                )
            streamed = [dict(answers.get(timeout=30).get_response().parameters) for _ in range(2)]
            client.stop_stream()
        return unary, streamed

    ours, theirs = (
        await in_thread(lambda: parameters(running.router.address)),
        await in_thread(lambda: parameters(triton_grpc)),
    )
    assert ours == theirs
    assert ours[0] == {}
    assert all(streamed["triton_final_response"].bool_param for streamed in ours[1])


async def test_shared_memory_is_refused_saying_why(mesh: MeshFactory) -> None:
    running = await mesh(real=True)
    async with aioclient.InferenceServerClient(running.router.address) as client:
        for call in (
            client.get_system_shared_memory_status,
            lambda: client.register_system_shared_memory("region", "/region", 64),
            lambda: client.unregister_system_shared_memory("region"),
            client.get_cuda_shared_memory_status,
            lambda: client.register_cuda_shared_memory("region", base64.b64encode(b"handle"), 0, 64),
            lambda: client.unregister_cuda_shared_memory("region"),
        ):
            with pytest.raises(InferenceServerException) as refused:
                await call()
            assert refused.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)
            assert "cannot map a region of the client's memory" in str(refused.value.message())


async def test_repository_load_follows_deployments_and_unload_is_refused_for_admins_only(
    mesh: MeshFactory, make_route: RouteFactory
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    running = await mesh(
        real=True, routes=lambda endpoints: [make_route("simple", endpoints), make_route("iris", [nowhere])]
    )
    async with aioclient.InferenceServerClient(running.router.address) as client:

        async def code(call: Awaitable[Any]) -> str:
            with pytest.raises(InferenceServerException) as refused:
                await call
            return str(refused.value.status())

        assert await code(client.load_model("simple", headers=TENANT)) == str(
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert await code(client.unload_model("simple", headers=TENANT)) == str(
            grpc.StatusCode.PERMISSION_DENIED
        )
        await client.load_model("simple", headers=ADMIN)
        assert await code(client.load_model("digits", headers=ADMIN)) == str(grpc.StatusCode.NOT_FOUND)
        assert await code(client.load_model("iris", headers=ADMIN)) == str(grpc.StatusCode.UNAVAILABLE)
        assert await code(client.load_model("simple", headers=ADMIN, config='{"max_batch_size": 2}')) == str(
            grpc.StatusCode.FAILED_PRECONDITION
        )
        with pytest.raises(InferenceServerException) as refused:
            await client.unload_model("simple", headers=ADMIN)
        assert refused.value.status() == str(grpc.StatusCode.FAILED_PRECONDITION)
        assert "deployments" in str(refused.value.message())
        assert await client.is_model_ready("simple")


async def test_repository_index_lists_every_routed_version_with_tritons_states(
    mesh: MeshFactory, make_route: RouteFactory
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    running = await mesh(
        real=True,
        routes=lambda endpoints: [
            make_route("simple", endpoints),
            make_route("digits", endpoints, weights={"1": 100, "7": 0}),
            make_route("iris", [nowhere]),
        ],
    )
    async with aioclient.InferenceServerClient(running.router.address) as client:
        index = [
            (m.name, m.version, m.state, m.reason) for m in (await client.get_model_repository_index()).models
        ]
        ready = [(m.name, m.version) for m in (await client.get_model_repository_index()).models]
        only_ready = await running_index(running.router.address)
    assert index == [
        ("digits", "1", "READY", ""),
        ("digits", "7", "UNAVAILABLE", "not in the model repository of pool pools/test"),
        ("iris", "1", "UNAVAILABLE", "no orchestrator of pool pools/test answered"),
        ("simple", "1", "READY", ""),
    ]
    assert ready == [(name, version) for name, version, _, _ in index]
    assert only_ready == [("digits", "1"), ("simple", "1")]


async def running_index(address: str) -> list[tuple[str, str]]:
    """The router's index of ready models only."""
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await triton_service.GRPCInferenceServiceStub(channel).RepositoryIndex(
            triton.RepositoryIndexRequest(ready=True)
        )
    return [(entry.name, entry.version) for entry in answer.models]
