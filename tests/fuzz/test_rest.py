"""The REST surface through Envoy fed malformed bodies and parameters: text that is not JSON, JSON
of the wrong types, nesting far deeper than any message, bodies past the cap, odd path segments
and query values. Every answer is 2xx or 4xx, and every 4xx carries a google.rpc status that
names a client error."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import example, given
from hypothesis import strategies as st

from tensorway.edge.config import load_values
from tests.fuzz.budget import fuzz_budget
from tests.fuzz.conftest import FuzzMesh
from tests.fuzz.outcomes import assert_mesh_serves
from tests.fuzz.strategies import edgy_text, json_values

# google.rpc codes of errors that are the server's fault.
SERVER_FAULT_CODES = {2, 13, 14, 15}  # UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS
PATH_PARAMETER = re.compile(r"\{([^}]+)\}")
# Just past the listener's body cap of 4 MiB (envoy/values).
PAST_THE_CAP = 4 * 1024 * 1024 + 1


@pytest.fixture(scope="module")
def operations(fuzz_mesh: FuzzMesh) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path template, operation) for every operation of the OpenAPI document, but
    deletes: one could take a demo model from the tests that run after."""
    document = json.loads(fuzz_mesh.openapi.read_text())
    found = [
        (method.upper(), path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in ("get", "post", "patch", "put")
    ]
    assert len(found) >= 15
    return found


def segments() -> st.SearchStrategy[str]:
    """A path segment: a demo model's name or version, a name of nothing, or odd text, escaped."""
    return st.one_of(
        st.sampled_from(["iris", "digits", "simple", "1", "production", "nosuch", "local", "main"]),
        edgy_text().map(lambda text: quote(text, safe="")),
        st.sampled_from(["%00", "%ff%fe", "..", "%2F", "a%20b", "-", "~", "x" * 5000]),
    )


def bodies() -> st.SearchStrategy[tuple[bytes, str]]:
    """(body, content type) that no operation should take as it is."""
    deep = st.integers(60, 200_000).flatmap(
        lambda depth: st.sampled_from(
            [
                b"[" * depth + b"]" * depth,
                b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}",
                b'{"a":' * depth + b"1" + b"}" * depth,
            ]
        )
    )
    wrong_types = st.builds(
        lambda names, values: json.dumps(dict(zip(names, values, strict=False)), allow_nan=True).encode(),
        st.lists(
            st.sampled_from(
                [
                    "inputs",
                    "outputs",
                    "parameters",
                    "model",
                    "pool",
                    "traffic",
                    "job",
                    "shape",
                    "contents",
                    "name",
                    "endpoints",
                    "raw_contents",
                    "update_mask",
                ]
            ),
            max_size=4,
        ),
        st.lists(json_values(), max_size=4),
    )
    tensors = st.builds(
        lambda shape, contents, raw: json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": shape,
                        "contents": contents,
                        "raw_contents": raw,
                    }
                ]
            },
            allow_nan=True,
        ).encode(),
        st.lists(st.one_of(st.integers(-(2**64), 2**64), st.text(max_size=4), st.floats()), max_size=4),
        st.one_of(
            st.dictionaries(
                st.sampled_from(["fp32_contents", "int_contents", "bytes_contents", "x"]),
                json_values(),
                max_size=2,
            ),
            json_values(),
        ),
        st.one_of(st.none(), st.sampled_from(["!!notbase64", "AAAA", "A" * 3]), json_values()),
    )
    payloads = st.one_of(
        st.binary(max_size=100),
        json_values().map(lambda value: json.dumps(value, allow_nan=True).encode()),
        wrong_types,
        tensors,
        deep,
        st.just(b" " * PAST_THE_CAP),
        st.sampled_from(
            [b"", b"{", b'{"inputs": [', b"\xef\xbb\xbf{}", b"null", b'{"a": 1, "a": 2}', b"{}" * 1000]
        ),
    )
    types = st.sampled_from(
        [
            "application/json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/json; charset=latin1",
            "",
        ]
    )
    return st.tuples(payloads, types)


def queries() -> st.SearchStrategy[dict[str, str]]:
    names = st.one_of(
        st.sampled_from(
            ["page_size", "page_token", "filter", "update_mask", "model_version", "etag", "stage"]
        ),
        st.text(max_size=8),
    )
    values = st.one_of(
        st.sampled_from(["abc", "-1", "99999999999999999999", "1e3", "", "STAGE_NOPE", "true"]), edgy_text()
    )
    return st.dictionaries(names, values, max_size=3)


# Envoy's listener.max_request_headers_kb in every profile.
HEADER_CAP_BYTES = load_values("local")["listener"]["max_request_headers_kb"] * 1024


def assert_client_answer(reply: requests.Response) -> None:
    assert reply.status_code < 500, f"{reply.status_code}: {reply.text[:500]}"
    if reply.status_code >= 400:
        status = reply.json()
        assert isinstance(status.get("code"), int), reply.text[:500]
        assert status["code"] not in SERVER_FAULT_CODES, reply.text[:500]


@fuzz_budget(max_examples=200)
@given(data=st.data())
def test_malformed_rest_calls_get_a_client_error(
    fuzz_mesh: FuzzMesh,
    http: requests.Session,
    operations: list[tuple[str, str, dict[str, Any]]],
    data: st.DataObject,
) -> None:
    method, template, _ = data.draw(st.sampled_from(operations))
    path = PATH_PARAMETER.sub(lambda _: data.draw(segments()), template)
    body, content_type = data.draw(bodies()) if method != "GET" else (b"", "")
    headers = fuzz_mesh.rest_headers()
    if content_type:
        headers["content-type"] = content_type
    request = http.prepare_request(
        requests.Request(
            method, f"{fuzz_mesh.envoy_url}{path}", params=data.draw(queries()), data=body, headers=headers
        )
    )
    try:
        reply = http.send(request, timeout=30)
    except requests.ConnectionError:
        # Envoy answers a request whose headers pass its cap with 431 and closes the connection;
        # a client still sending a far larger request line may see the close before the answer.
        assert len(request.url or "") > HEADER_CAP_BYTES, request.url
    else:
        assert_client_answer(reply)
    assert not fuzz_mesh.dead_processes(), f"crashed: {fuzz_mesh.dead_processes()}"


@fuzz_budget(max_examples=60)
@given(body=bodies())
@example(body=(b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"))
def test_malformed_infer_bodies_get_a_client_error(
    fuzz_mesh: FuzzMesh, http: requests.Session, body: tuple[bytes, str]
) -> None:
    payload, content_type = body
    headers = {**fuzz_mesh.rest_headers(), "content-type": content_type or "application/json"}
    reply = http.post(
        f"{fuzz_mesh.envoy_url}/v1/models/iris:infer", data=payload, headers=headers, timeout=30
    )
    assert_client_answer(reply)


def test_the_edge_still_serves_after_the_fuzzing(fuzz_mesh: FuzzMesh, http: requests.Session) -> None:
    assert_mesh_serves(fuzz_mesh)
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 4],
                "contents": {"fp32_contents": [5.1, 3.5, 1.4, 0.2]},
            }
        ]
    }
    reply = http.post(
        f"{fuzz_mesh.envoy_url}/v1/models/iris:infer", json=body, headers=fuzz_mesh.rest_headers(), timeout=30
    )
    assert reply.status_code == 200, reply.text
    assert {output["name"] for output in reply.json()["outputs"]} == {"label", "probabilities"}
