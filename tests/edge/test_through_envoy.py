"""The edge end to end: REST, gRPC, gRPC-Web and Triton's client through a real Envoy in front
of the real router, registry and batch API, with the real ratelimit service on Redis."""

from __future__ import annotations

import json
import struct
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import jwt
import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography.hazmat.primitives.asymmetric import rsa

from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.inference.v1 import inference_service_pb2_grpc as inference_grpc

if TYPE_CHECKING:
    from tests.edge_mesh import Edge

PIXELS = np.random.default_rng(3).uniform(0, 16, size=(2, 64)).astype(np.float32)


def digits_body() -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [2, 64],
                "contents": {"fp32_contents": [float(v) for v in PIXELS.ravel()]},
            }
        ]
    }


def test_rest_infer_on_digits_returns_json_outputs(edge: Edge) -> None:
    reply = edge.http.post(
        f"{edge.url}/v1/models/digits:infer", json=digits_body(), headers=edge.headers(), timeout=10
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model_name"] == "digits"
    outputs = {output["name"]: output for output in body["outputs"]}
    # Proto field names, and proto3 JSON: 64-bit integers are strings.
    assert outputs["probabilities"]["shape"] == ["2", "10"]
    probabilities = np.array(outputs["probabilities"]["contents"]["fp32_contents"]).reshape(2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    labels = [int(v) for v in outputs["label"]["contents"]["int64_contents"]]
    assert labels == list(probabilities.argmax(axis=1))


def test_grpc_and_tritonclient_through_envoy_agree_with_rest(edge: Edge) -> None:
    rest = edge.http.post(
        f"{edge.url}/v1/models/digits:infer", json=digits_body(), headers=edge.headers(), timeout=10
    )
    rest_probabilities = next(o for o in rest.json()["outputs"] if o["name"] == "probabilities")
    expected = np.array(rest_probabilities["contents"]["fp32_contents"], dtype=np.float32).reshape(2, 10)

    auth = [("authorization", f"Bearer {edge.token('acme')}")]
    request = inference_pb.InferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 64]).contents.fp32_contents.extend(
        PIXELS.ravel()
    )
    with edge.channel() as channel:
        reply = inference_grpc.InferenceServiceStub(channel).Infer(request, metadata=auth, timeout=10)
    output = next(o for o in reply.outputs if o.name == "probabilities")
    np.testing.assert_allclose(np.array(output.contents.fp32_contents).reshape(2, 10), expected, rtol=1e-6)

    client = triton.InferenceServerClient(edge.address, ssl=True, root_certificates=str(edge.ca))
    pixels = triton.InferInput("input", [2, 64], "FP32")
    pixels.set_data_from_numpy(PIXELS)
    try:
        routed = client.infer("digits", [pixels], headers=dict(auth)).as_numpy("probabilities")
    finally:
        client.close()
    np.testing.assert_allclose(routed, expected, rtol=1e-6)


def test_grpc_web_reaches_the_router(edge: Edge) -> None:
    message = inference_pb.GetModelMetadataRequest(model_name="iris").SerializeToString()
    reply = edge.http.post(
        f"{edge.url}/tensorway.inference.v1.InferenceService/GetModelMetadata",
        data=struct.pack(">BI", 0, len(message)) + message,
        headers=edge.headers(**{"content-type": "application/grpc-web+proto", "x-grpc-web": "1"}),
        timeout=10,
    )
    assert reply.status_code == 200
    flag, length = struct.unpack(">BI", reply.content[:5])
    assert flag == 0
    metadata = inference_pb.GetModelMetadataResponse.FromString(reply.content[5 : 5 + length])
    assert metadata.name == "iris"
    assert b"grpc-status:0" in reply.content[5 + length :].replace(b" ", b"")


def test_registry_and_batch_over_rest(edge: Edge) -> None:
    listed = edge.http.get(
        f"{edge.url}/v1/models", params={"page_size": 10}, headers=edge.headers(), timeout=10
    )
    assert listed.status_code == 200, listed.text
    assert {"models/simple", "models/digits", "models/iris"} <= {m["name"] for m in listed.json()["models"]}

    resolved = edge.http.get(f"{edge.url}/v1/models/digits:resolve", headers=edge.headers(), timeout=10)
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["version"] == "1"

    # The registry's GetModel shares its path with the router's metadata, which the edge serves.
    metadata = edge.http.get(f"{edge.url}/v1/models/digits", headers=edge.headers(), timeout=10)
    assert metadata.json()["inputs"][0]["name"] == "input"

    jobs = edge.http.get(f"{edge.url}/v1/jobs", headers=edge.headers(), timeout=10)
    assert jobs.status_code == 200, jobs.text
    assert "jobs" in jobs.json()
    missing = edge.http.get(f"{edge.url}/v1/jobs/{uuid.uuid4()}", headers=edge.headers(), timeout=10)
    assert missing.status_code == 404
    assert missing.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_missing_or_bad_tokens_are_unauthenticated(edge: Edge) -> None:
    url = f"{edge.url}/v1/models/digits"
    missing = edge.http.get(url, timeout=10)
    assert missing.status_code == 401
    assert missing.json() == {"code": 16, "message": "Jwt is missing", "details": []}

    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"iss": "tensorway-local", "aud": "tensorway", "tenant": "acme"}, stranger, "RS256")
    # Older than Envoy's 60 s of allowed clock skew.
    expired = edge.token("acme", ttl=timedelta(minutes=-10))
    for token in (forged, expired, "not-a-jwt"):
        reply = edge.http.get(url, headers={"authorization": f"Bearer {token}"}, timeout=10)
        assert reply.status_code == 401, (reply.headers, reply.text)
        assert reply.json()["code"] == 16

    with edge.channel() as channel, pytest.raises(grpc.RpcError) as error:
        inference_grpc.InferenceServiceStub(channel).GetModelMetadata(
            inference_pb.GetModelMetadataRequest(model_name="digits"), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_without_a_tenant_is_refused(edge: Edge) -> None:
    tenantless = jwt.encode(
        {"iss": "tensorway-local", "aud": "tensorway", "exp": int(time.time()) + 60},
        edge.private_key.read_bytes(),
        "RS256",
        headers={"kid": "tensorway-local"},
    )
    reply = edge.http.get(
        f"{edge.url}/v1/models", headers={"authorization": f"Bearer {tenantless}"}, timeout=10
    )
    assert reply.status_code == 403
    assert reply.json()["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]


def test_the_tenant_comes_from_the_token_not_the_client(edge: Edge) -> None:
    # Envoy makes its own request ids for outside callers, so the user agent marks the request.
    marker = f"edge-test-{uuid.uuid4().hex}"
    reply = edge.http.get(
        f"{edge.url}/v1/models",
        headers=edge.headers("acme", **{"x-tenant-id": "someone-else", "user-agent": marker}),
        timeout=10,
    )
    assert reply.status_code == 200, (reply.headers, reply.text)
    # The access log records the tenant header as forwarded upstream.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in edge.access_log.read_text().splitlines() if marker in line]
        if lines:
            break
        time.sleep(0.1)
    assert [line["tenant"] for line in lines] == ["acme"]
    assert lines[0]["path"] == "/v1/models"
    assert lines[0]["grpc_method"] == "/tensorway.registry.v1.RegistryService/ListModels"


def test_errors_of_the_rest_surface(edge: Edge) -> None:
    headers = edge.headers()
    malformed = edge.http.post(
        f"{edge.url}/v1/models/digits:infer", data='{"inputs": [', headers=headers, timeout=10
    )
    assert malformed.status_code == 400
    assert malformed.json()["code"] == 3
    assert "Expected a value" in malformed.json()["message"]

    unknown = edge.http.get(f"{edge.url}/v1/nothing/here", headers=headers, timeout=10)
    assert unknown.status_code == 404
    assert unknown.json()["code"] == 5

    unknown_parameter = edge.http.get(
        f"{edge.url}/v1/models", params={"colour": "red"}, headers=headers, timeout=10
    )
    assert unknown_parameter.status_code == 400
    assert "colour" in unknown_parameter.json()["message"]

    oversize = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 64],
                "contents": {"fp32_contents": [0.5] * 1_000_000},
            }
        ]
    }
    too_big = edge.http.post(f"{edge.url}/v1/models/digits:infer", json=oversize, headers=headers, timeout=10)
    assert too_big.status_code == 413
    assert too_big.json()["code"] == 8

    # A model error from the router keeps its details through the transcoder.
    not_found = edge.http.post(f"{edge.url}/v1/models/nosuch:infer", json={}, headers=headers, timeout=10)
    assert not_found.status_code == 404
    assert not_found.json()["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"


def test_health_docs_and_cors_need_no_token(edge: Edge) -> None:
    assert edge.http.get(f"{edge.url}/healthz", timeout=10).status_code == 200
    with edge.channel() as channel:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    page = edge.http.get(f"{edge.url}/docs/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "swagger-ui-bundle.js" in page.text
    script = edge.http.get(f"{edge.url}/docs/swagger-ui-bundle.js", timeout=10)
    assert script.status_code == 200
    assert len(script.content) > 100_000
    document = edge.http.get(f"{edge.url}/openapi.json", timeout=10).json()
    assert "/v1/models/{model_name}:infer" in document["paths"]

    preflight = edge.http.options(
        f"{edge.url}/v1/models/digits:infer",
        headers={
            "origin": "http://localhost:3000",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        },
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    foreign = edge.http.options(
        f"{edge.url}/v1/models/digits:infer",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        timeout=10,
    )
    assert "access-control-allow-origin" not in foreign.headers


def wait_for_next_second() -> None:
    time.sleep(1.0 - time.time() % 1.0 + 0.05)


def test_past_a_limit_429_with_headers_then_success_after_the_window(edge: Edge) -> None:
    url = f"{edge.url}/v1/models"
    headers = edge.headers("burst")
    wait_for_next_second()  # the limit's window is a calendar second: start at its beginning
    codes = [edge.http.get(url, headers=headers, timeout=10) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    assert codes[0].headers["x-ratelimit-remaining"] == "2"
    limited = codes[3]
    assert limited.json()["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert limited.headers["retry-after"] == "1"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert 'name="burst-requests"' in limited.headers["x-ratelimit-limit"]
    time.sleep(float(limited.headers["retry-after"]))
    assert edge.http.get(url, headers=headers, timeout=10).status_code == 200


def test_grpc_past_a_limit_is_resource_exhausted(edge: Edge) -> None:
    auth = [("authorization", f"Bearer {edge.token('grpc-burst')}")]
    request = inference_pb.GetModelMetadataRequest(model_name="simple")
    wait_for_next_second()
    with edge.channel() as channel:
        stub = inference_grpc.InferenceServiceStub(channel)
        for _ in range(2):
            stub.GetModelMetadata(request, metadata=auth, timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            stub.GetModelMetadata(request, metadata=auth, timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_declared_rows_are_the_cost(edge: Edge) -> None:
    # Every tenant may send 10 rows a minute in the test limits; this tenant is fresh.
    headers = edge.headers(f"rows-{uuid.uuid4().hex[:8]}", **{"x-tensorway-rows": "6"})
    url = f"{edge.url}/v1/models/digits:infer"
    first = edge.http.post(url, json=digits_body(), headers=headers, timeout=10)
    assert first.status_code == 200, first.text
    second = edge.http.post(url, json=digits_body(), headers=headers, timeout=10)
    assert second.status_code == 429
    assert 'name="tenant-rows"' in second.headers["x-ratelimit-limit"]


def test_per_model_limits_from_the_rest_path(edge: Edge) -> None:
    iris = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 4],
                "contents": {"fp32_contents": [5.1, 3.5, 1.4, 0.2]},
            }
        ]
    }
    codes = []
    for tenant in ("model-a", "model-b", "model-c"):
        reply = edge.http.post(
            f"{edge.url}/v1/models/iris:infer", json=iris, headers=edge.headers(tenant), timeout=10
        )
        codes.append(reply.status_code)
    # Two a minute for iris across tenants; other models are not held back by it.
    assert codes == [200, 200, 429]
    digits = edge.http.post(
        f"{edge.url}/v1/models/digits:infer", json=digits_body(), headers=edge.headers("model-c"), timeout=10
    )
    assert digits.status_code == 200
