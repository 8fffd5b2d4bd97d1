"""Triton's V2 HTTP/REST protocol on the router's HTTP port: `tritonclient.http`, sync and asyncio,
pointed at the router and at Triton's own HTTP port in the same test, gets the same answers (JSON
and binary tensors) and the same status codes; and the HTTP door routes as the gRPC one does."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from tensorway.devstack import ServiceEndpoints, Stack
from tensorway.tensors.v2_http import HEADER_LENGTH
from tests.router.conftest import DEMO_MODELS, Mesh, MeshFactory, RouteFactory
from tests.router.test_triton_clients import OUTPUTS, demo_inputs

Array = npt.NDArray[Any]


@pytest.fixture(scope="session")
def triton_http(service_endpoints: ServiceEndpoints, request: pytest.FixtureRequest) -> str:
    """The HTTP address, host:port, of the Triton that `triton_grpc` names."""
    if service_endpoints.triton_grpc:
        pytest.skip("a Triton given by TENSORWAY_TRITON_GRPC has no known HTTP address")
    stack: Stack = request.getfixturevalue("dev_stack")
    return stack.ensure(["triton"]).endpoints()["triton_http"].address


def http_address(mesh: Mesh) -> str:
    return f"127.0.0.1:{mesh.router.server.ports['http']}"


def http_inputs(arrays: dict[str, Array], binary: bool) -> list[httpclient.InferInput]:
    """Inputs for either tritonclient.http client, as JSON values or binary tensors."""
    tensors = []
    for name, array in arrays.items():
        datatype = "BYTES" if array.dtype == np.object_ else httpclient.np_to_triton_dtype(array.dtype)
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    return tensors


def requested(model: str, binary: bool) -> list[httpclient.InferRequestedOutput]:
    return [httpclient.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS[model]]


def outputs_of(result: Any, model: str) -> dict[str, Array]:
    return {name: result.as_numpy(name) for name in OUTPUTS[model]}


def assert_same(answer: dict[str, Array], expected: dict[str, Array]) -> None:
    assert answer.keys() == expected.keys()
    for name, array in expected.items():
        assert answer[name].dtype == array.dtype, name
        np.testing.assert_array_equal(answer[name], array)


def in_thread(call: Callable[..., Any], *args: Any) -> Any:
    # The router runs on this test's event loop: a blocking client must not block it.
    return asyncio.to_thread(call, *args)


# (binary inputs, binary outputs): JSON both ways, binary both ways, and each one alone.
ENCODINGS = [(False, False), (True, True), (True, False), (False, True)]


async def test_sync_client_gets_tritons_answers_in_json_and_binary(
    mesh: MeshFactory, triton_http: str
) -> None:
    running = await mesh(real=True)

    def call(address: str) -> dict[tuple[str, bool, bool], dict[str, Array]]:
        answers = {}
        with httpclient.InferenceServerClient(address) as client:
            assert client.is_server_live()
            assert client.is_server_ready()
            for model in DEMO_MODELS:
                assert client.is_model_ready(model)
                for binary_in, binary_out in ENCODINGS:
                    result = client.infer(
                        model,
                        http_inputs(demo_inputs(model), binary_in),
                        outputs=requested(model, binary_out),
                        request_id="r-1",
                    )
                    assert result.get_response()["id"] == "r-1"
                    answers[model, binary_in, binary_out] = outputs_of(result, model)
                # No outputs named: every output, binary (tritonclient asks binary_data_output).
                result = client.infer(model, http_inputs(demo_inputs(model), True))
                answers[model, True, None] = outputs_of(result, model)  # type: ignore[index]
        return answers

    ours, theirs = (
        await in_thread(lambda: call(http_address(running))),
        await in_thread(lambda: call(triton_http)),
    )
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        assert_same(ours[key], expected)


async def test_asyncio_client_gets_tritons_answers_in_json_and_binary(
    mesh: MeshFactory, triton_http: str
) -> None:
    running = await mesh(real=True)
    for model in DEMO_MODELS:
        for binary_in, binary_out in ENCODINGS:
            answers = []
            for address in (http_address(running), triton_http):
                async with aiohttpclient.InferenceServerClient(address) as client:
                    assert await client.is_model_ready(model)
                    result = await client.infer(
                        model,
                        http_inputs(demo_inputs(model), binary_in),
                        outputs=requested(model, binary_out),
                    )
                    answers.append(outputs_of(result, model))
            assert_same(*answers)


async def test_compressed_request_bodies(mesh: MeshFactory, triton_http: str) -> None:
    running = await mesh(real=True)

    def call(address: str, algorithm: str) -> dict[str, Array]:
        with httpclient.InferenceServerClient(address) as client:
            result = client.infer(
                "simple",
                http_inputs(demo_inputs("simple"), True),
                request_compression_algorithm=algorithm,
            )
            return outputs_of(result, "simple")

    for algorithm in ("gzip", "deflate"):
        assert_same(
            await in_thread(call, http_address(running), algorithm),
            await in_thread(call, triton_http, algorithm),
        )


async def test_metadata_config_and_repository_index_as_triton_gives_them(
    mesh: MeshFactory, triton_http: str
) -> None:
    running = await mesh(real=True)
    async with (
        aiohttpclient.InferenceServerClient(http_address(running)) as routed,
        aiohttpclient.InferenceServerClient(triton_http) as direct,
    ):
        assert await routed.is_server_live()
        assert await routed.is_server_ready()
        metadata = await routed.get_server_metadata()
        assert {"name", "version", "extensions"} <= metadata.keys()
        for model in DEMO_MODELS:
            ours, theirs = await routed.get_model_metadata(model), await direct.get_model_metadata(model)
            assert ours == theirs
            assert await routed.get_model_metadata(model, "1") == theirs
            our_config, their_config = (
                await routed.get_model_config(model),
                await direct.get_model_config(model),
            )
            for key in ("name", "max_batch_size"):
                assert our_config[key] == their_config[key]
            for key in ("input", "output"):
                fields = ("name", "data_type", "dims")
                assert [{f: t[f] for f in fields} for t in our_config[key]] == [
                    {f: t[f] for f in fields} for t in their_config[key]
                ]
        index = await routed.get_model_repository_index()
        assert sorted((m["name"], m["version"], m["state"]) for m in index) == [
            (model, "1", "READY") for model in sorted(DEMO_MODELS)
        ]


async def status_of(call: Any) -> str:
    with pytest.raises(InferenceServerException) as raised:
        await call
    assert raised.value.message()
    return str(raised.value.status())


async def test_refusals_have_tritons_status_codes(mesh: MeshFactory, triton_http: str) -> None:
    running = await mesh(real=True)
    inputs = demo_inputs("simple")
    wrong_shape = httpclient.InferInput("INPUT0", [2, 15], "INT32")
    wrong_shape.set_data_from_numpy(np.zeros((2, 15), dtype=np.int32), binary_data=True)
    wrong_type = httpclient.InferInput("INPUT0", [2, 16], "FP32")
    wrong_type.set_data_from_numpy(np.zeros((2, 16), dtype=np.float32), binary_data=True)
    other = http_inputs({"INPUT1": inputs["INPUT1"]}, True)
    statuses: list[dict[str, Any]] = []
    for address in (http_address(running), triton_http):
        async with aiohttpclient.InferenceServerClient(address) as client:
            statuses.append(
                {
                    "unknown model": await status_of(
                        client.infer("no-such-model", http_inputs(inputs, True))
                    ),
                    "unknown model metadata": await status_of(client.get_model_metadata("no-such-model")),
                    "unknown model ready": await client.is_model_ready("no-such-model"),
                    "version abc": await status_of(
                        client.infer("simple", http_inputs(inputs, True), model_version="abc")
                    ),
                    "version abc metadata": await status_of(client.get_model_metadata("simple", "abc")),
                    "wrong shape": await status_of(client.infer("simple", [wrong_shape, *other])),
                    "wrong datatype": await status_of(client.infer("simple", [wrong_type, *other])),
                }
            )
    ours, theirs = statuses
    assert ours == theirs
    assert ours["unknown model"] == "404"
    assert ours["wrong shape"] == ours["wrong datatype"] == "400"


async def test_malformed_bodies_are_400_with_a_v2_error(mesh: MeshFactory) -> None:
    running = await mesh(real=True)
    url = f"http://{http_address(running)}/v2/models/simple/infer"
    good = (
        b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32",'
        b' "parameters": {"binary_data_size": 64}}]}'
    )
    bodies: list[tuple[bytes, dict[str, str]]] = [
        (b"not json", {}),
        (b"[]", {}),
        (b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": ["a"]}]}', {}),
        (b'{"inputs": [{"name": "INPUT0", "shape": "x", "datatype": "INT32", "data": [1]}]}', {}),
        (good + bytes(10), {HEADER_LENGTH: str(len(good))}),
        (good + bytes(100), {HEADER_LENGTH: str(len(good))}),
        (good, {HEADER_LENGTH: "a lot"}),
        (gzip.compress(b"x" * 100)[:20], {"Content-Encoding": "gzip"}),
    ]
    async with aiohttp.ClientSession() as session:
        for body, headers in bodies:
            async with session.post(url, data=body, headers=headers) as response:
                assert response.status == 400, body
                assert isinstance((await response.json())["error"], str)
        async with session.get(f"http://{http_address(running)}/v2/nowhere") as response:
            assert (response.status, (await response.json())["error"]) == (404, "Not Found")


async def test_http_routes_as_grpc_does_with_the_callers_key_and_deadline(
    mesh: MeshFactory, make_route: RouteFactory
) -> None:
    running = await mesh(
        orchestrators=1,
        routes=lambda endpoints: [make_route("simple", endpoints, weights={"1": 50, "2": 50})],
    )
    orchestrator = running.orchestrators[0]

    def call(key: str) -> None:
        with httpclient.InferenceServerClient(http_address(running)) as client:
            for _ in range(8):
                client.infer(
                    "simple",
                    http_inputs(demo_inputs("simple"), True),
                    headers={"x-tensorway-route-key": key, "x-envoy-expected-rq-timeout-ms": "30000"},
                )

    for key in ("tenant-a", "tenant-b", "tenant-c", "tenant-d"):
        before = len(orchestrator.versions)
        await in_thread(call, key)
        assert len(set(orchestrator.versions[before:])) == 1
    assert set(orchestrator.versions) <= {"1", "2"}
    # The deadline Envoy gives the route reached the orchestrator as the gRPC call's deadline.
    assert all(deadline is not None and 0 < deadline <= 31 for deadline in orchestrator.deadlines)
