"""The edge end to end: REST, gRPC, gRPC-Web and Triton's client through a real Envoy in front
of the real router, registry and batch API, with the router's global limits leased from Redis."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import jwt
import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tritonclient.utils import InferenceServerException

from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.inference.v1 import inference_service_pb2_grpc as inference_grpc
from tests.edge_mesh import ROUTER_LOCAL_LIMIT
from tests.waiting import eventually_blocking

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


def test_rest_streams_a_decoupled_models_answers_as_server_sent_events(edge: Edge) -> None:
    prompt = "tokens come one by one"
    body = {
        "inputs": [
            {
                "name": "PROMPT",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": [base64.b64encode(prompt.encode()).decode()]},
            }
        ]
    }
    with edge.http.post(
        f"{edge.url}/v1/models/tokens:inferStream", json=body, headers=edge.headers(), stream=True, timeout=30
    ) as reply:
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [
            json.loads(line.removeprefix("data: "))
            for line in reply.iter_lines(decode_unicode=True)
            if line.startswith("data: ")
        ]
    answers = [event["response"] for event in events]
    tokens = [
        base64.b64decode(
            next(o for o in a["outputs"] if o["name"] == "TOKEN")["contents"]["bytes_contents"][0]
        )
        for a in answers
        if a.get("outputs")
    ]
    assert tokens == [word.encode() for word in prompt.split()]
    # The last event is the one that carries Triton's final flag.
    assert answers[-1]["parameters"]["triton_final_response"]["bool_value"] is True
    assert not any(a["parameters"]["triton_final_response"].get("bool_value") for a in answers[:-1])


def test_unary_rest_infer_on_a_decoupled_model_is_refused_as_triton_refuses_it(edge: Edge) -> None:
    body = {
        "inputs": [
            {
                "name": "PROMPT",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": [base64.b64encode(b"a b").decode()]},
            }
        ]
    }
    reply = edge.http.post(
        f"{edge.url}/v1/models/tokens:infer", json=body, headers=edge.headers(), timeout=10
    )
    assert reply.status_code == 501, reply.text
    assert "decoupled" in reply.json()["message"]


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
    lines = eventually_blocking(
        lambda: [json.loads(line) for line in edge.access_log.read_text().splitlines() if marker in line],
        what="the request's access log line",
    )
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


def error_info(body: dict[str, Any]) -> dict[str, Any]:
    """The google.rpc.ErrorInfo of a REST error body."""
    return next(d for d in body["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")


def retry_delay(body: dict[str, Any]) -> float:
    """The google.rpc.RetryInfo delay of a REST error body, in seconds."""
    info = next(d for d in body["details"] if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
    return float(str(info["retry_delay"]).removesuffix("s"))


def grpc_details(error: grpc.RpcError) -> dict[str, Any]:
    """The ErrorInfo metadata and RetryInfo delay of a gRPC error's status details."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    found: dict[str, Any] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found["metadata"] = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found["retry_delay"] = retry.retry_delay.ToTimedelta().total_seconds()
    return found


def digits_request(rows: int) -> inference_pb.InferRequest:
    request = inference_pb.InferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[rows, 64]).contents.fp32_contents.extend(
        [1.0] * (rows * 64)
    )
    return request


def test_past_a_limit_429_names_the_limit_and_when_to_retry(edge: Edge) -> None:
    # The test limits let tenant `burst` make three inference requests an hour.
    url = f"{edge.url}/v1/models/digits:infer"
    codes = [
        edge.http.post(url, json=digits_body(), headers=edge.headers("burst"), timeout=10) for _ in range(4)
    ]
    assert [r.status_code for r in codes] == [200, 200, 200, 429], codes[-1].text
    body = codes[3].json()
    assert body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert error_info(body)["metadata"] == {"limit": "burst-requests"}
    assert 0 < retry_delay(body) <= 3600  # until the hour's window ends
    # Another tenant is not held back, nor is the model.
    other = edge.http.post(url, json=digits_body(), headers=edge.headers(), timeout=10)
    assert other.status_code == 200, other.text


def test_past_the_local_limit_the_edge_refuses_inference_itself(edge: Edge) -> None:
    # Envoy's own per-tenant bucket on the inference routes (ROUTER_LOCAL_LIMIT calls a minute in
    # the test mesh), before the router's global limits (a thousand a second here).
    tenant = f"local-{uuid.uuid4().hex[:6]}"
    auth = [("authorization", f"Bearer {edge.token(tenant)}")]
    refused: grpc.RpcError | None = None
    with edge.channel() as channel:
        stub = inference_grpc.InferenceServiceStub(channel)
        for _ in range(3 * ROUTER_LOCAL_LIMIT):  # at least one refill's worth past the bucket
            try:
                stub.Infer(digits_request(1), metadata=auth, timeout=10)
            except grpc.RpcError as error:
                refused = error
                break
    assert refused is not None, "the flood was never refused"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert refused.details() == "local_rate_limited"  # Envoy's answer, not the router's
    metadata = dict(refused.initial_metadata()) | dict(refused.trailing_metadata())  # type: ignore[attr-defined]
    assert metadata["x-ratelimit-limit"] == str(ROUTER_LOCAL_LIMIT)
    assert metadata["x-ratelimit-remaining"] == "0"
    assert 0 <= int(metadata["x-ratelimit-reset"]) <= 60  # seconds to the next refill
    # REST is refused by the same bucket, as 429 with a google.rpc.Status body: at once, or once
    # a refill that came meanwhile (the machine may be slow) is spent.
    for _ in range(2 * ROUTER_LOCAL_LIMIT):
        rest = edge.http.post(
            f"{edge.url}/v1/models/digits:infer", json=digits_body(), headers=edge.headers(tenant), timeout=10
        )
        if rest.status_code != 200:
            break
    assert rest.status_code == 429, rest.text
    assert rest.json()["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert rest.headers["x-ratelimit-remaining"] == "0"
    assert 0 <= int(rest.headers["x-ratelimit-reset"]) <= 60
    # Another tenant's bucket is its own.
    other = edge.http.post(
        f"{edge.url}/v1/models/digits:infer", json=digits_body(), headers=edge.headers(), timeout=10
    )
    assert other.status_code == 200, other.text


def test_rest_rows_are_counted_from_the_tensors_whatever_the_headers_say(edge: Edge) -> None:
    # Tenant rows-rest may send 10 rows an hour: 6 rows fit once, not twice. A header claiming
    # fewer rows changes nothing (Envoy drops nothing the router reads: it reads the tensors).
    url = f"{edge.url}/v1/models/digits:infer"
    six = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [6, 64],
                "contents": {"fp32_contents": [1.0] * 384},
            }
        ]
    }
    headers = edge.headers("rows-rest", **{"x-tensorway-rows": "1"})
    first = edge.http.post(url, json=six, headers=headers, timeout=10)
    assert first.status_code == 200, first.text
    second = edge.http.post(url, json=six, headers=headers, timeout=10)
    assert second.status_code == 429, second.text
    assert error_info(second.json())["metadata"] == {"limit": "rest-rows"}
    # The refused request spent nothing: four more rows still fit.
    four = {"inputs": [{**six["inputs"][0], "shape": [4, 64], "contents": {"fp32_contents": [1.0] * 256}}]}
    assert edge.http.post(url, json=four, headers=headers, timeout=10).status_code == 200


def test_grpc_rows_are_counted_from_the_tensors(edge: Edge) -> None:
    auth = [("authorization", f"Bearer {edge.token('rows-grpc')}"), ("x-tensorway-rows", "1")]
    with edge.channel() as channel:
        stub = inference_grpc.InferenceServiceStub(channel)
        stub.Infer(digits_request(6), metadata=auth, timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Infer(digits_request(6), metadata=auth, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = grpc_details(refused.value)
        assert details["metadata"] == {"limit": "grpc-rows"}
        assert 0 < details["retry_delay"] <= 3600
        # Triton's API counts the same rows against the same limit.
        client = triton.InferenceServerClient(edge.address, ssl=True, root_certificates=str(edge.ca))
        pixels = triton.InferInput("input", [6, 64], "FP32")
        pixels.set_data_from_numpy(np.ones((6, 64), dtype=np.float32))
        try:
            with pytest.raises(InferenceServerException, match="grpc-rows"):
                client.infer("digits", [pixels], headers=dict(auth))
        finally:
            client.close()
        # Another tenant is unaffected.
        other = [("authorization", f"Bearer {edge.token('acme')}")]
        assert stub.Infer(digits_request(6), metadata=other, timeout=10).model_name == "digits"


def test_every_message_of_a_stream_counts(edge: Edge) -> None:
    # Tenant stream-burst may make five requests an hour: a stream of eight gets five answers
    # and three errors naming the limit, and the stream itself carries on to its end.
    auth = [("authorization", f"Bearer {edge.token('stream-burst')}")]
    requests_ = [inference_pb.StreamInferRequest(request=digits_request(1)) for _ in range(8)]
    for n, item in enumerate(requests_):
        item.request.id = str(n)
    with edge.channel() as channel:
        stub = inference_grpc.InferenceServiceStub(channel)
        answers = list(stub.StreamInfer(iter(requests_), metadata=auth, timeout=30))
    assert len(answers) == 8
    refused = [a for a in answers if a.HasField("error")]
    assert len(refused) == 3
    assert {a.error.code for a in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert all("stream-requests" in a.error.message for a in refused)


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
    # Two an hour for iris across tenants; other models are not held back by it.
    assert codes == [200, 200, 429]
    digits = edge.http.post(
        f"{edge.url}/v1/models/digits:infer", json=digits_body(), headers=edge.headers("model-c"), timeout=10
    )
    assert digits.status_code == 200
