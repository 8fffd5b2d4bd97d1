"""Triton's V2 HTTP/REST protocol through Envoy: `tritonclient.http`, sync and asyncio, over TLS
with a token, reaches the routers' HTTP port; without a token it is 401, and with a token whose
scopes leave out inference it is 403, each with a V2 error body the client reads."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from tensorway.edge.config import load_values
from tensorway.edge.keys import mint_token
from tensorway.runtime.context import Scope

if TYPE_CHECKING:
    from tests.edge_mesh import Edge

A = np.arange(32, dtype=np.int32).reshape(2, 16)
B = np.array([[1] * 16, [-7] * 16], dtype=np.int32)


def simple_inputs(binary: bool) -> list[httpclient.InferInput]:
    inputs = []
    for name, array in (("INPUT0", A), ("INPUT1", B)):
        tensor = httpclient.InferInput(name, list(array.shape), "INT32")
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def outputs(binary: bool) -> list[httpclient.InferRequestedOutput]:
    return [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("OUTPUT0", "OUTPUT1")]


def address(edge: Edge) -> str:
    return edge.url.removeprefix("https://")


def client(edge: Edge) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(address(edge), ssl=True, ssl_options={"ca_certs": str(edge.ca)})


def token_without_infer(edge: Edge) -> str:
    jwt = load_values("local")["jwt"]
    return mint_token(
        edge.private_key,
        tenant="acme",
        scopes=(Scope.BATCH, Scope.MODELS_READ),
        issuer=jwt["issuer"],
        audience=jwt["audiences"][0],
    )


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_infers_through_envoy_with_a_token(edge: Edge, binary: bool) -> None:
    headers = edge.headers("acme")
    with client(edge) as triton:
        assert triton.is_server_live(headers=headers)
        assert triton.is_model_ready("simple", headers=headers)
        assert triton.get_model_metadata("simple", headers=headers)["name"] == "simple"
        result = triton.infer(
            "simple", simple_inputs(binary), outputs=outputs(binary), headers=headers, request_id="edge-1"
        )
    assert result.get_response()["id"] == "edge-1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)


async def test_the_asyncio_client_infers_through_envoy(edge: Edge) -> None:
    context = ssl.create_default_context(cafile=str(edge.ca))
    async with aiohttpclient.InferenceServerClient(address(edge), ssl=True, ssl_context=context) as triton:
        result = await triton.infer("simple", simple_inputs(True), headers=edge.headers("acme"))
        with pytest.raises(InferenceServerException) as raised:
            await triton.infer("no-such-model", simple_inputs(True), headers=edge.headers("acme"))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    assert raised.value.status() == "404"
    assert "no-such-model" in str(raised.value.message())


@pytest.mark.parametrize(
    ("case", "status"),
    [("no token", "401"), ("a token without the infer scope", "403")],
)
def test_v2_calls_need_a_token_with_the_infer_scope(edge: Edge, case: str, status: str) -> None:
    headers: dict[str, Any] = (
        {} if case == "no token" else {"authorization": f"Bearer {token_without_infer(edge)}"}
    )
    with client(edge) as triton:
        for call in (
            lambda: triton.infer("simple", simple_inputs(True), headers=headers),
            lambda: triton.get_model_metadata("simple", headers=headers),
            lambda: triton.get_server_metadata(headers=headers),
        ):
            with pytest.raises(InferenceServerException) as raised:
                call()
            assert raised.value.status() == status
            # The V2 error body, which the client read: not "an exception occurred ... decoding".
            assert "decoding" not in str(raised.value.message())
