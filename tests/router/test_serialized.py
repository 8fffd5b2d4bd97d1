"""Requests the router forwards as bytes: what it reads off the wire agrees with a full parse."""

from __future__ import annotations

import pytest

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.router.serialized import SerializedRequest
from tensorway.runtime import InvalidArgument


def _request(version: str = "") -> pb.InferRequest:
    request = pb.InferRequest(
        model_name="digits",
        model_version=version,
        id="r-1",
        inputs=[tensor_pb2.Tensor(name="x", datatype="FP32", shape=[1, 4], raw_contents=bytes(16))],
        outputs=[pb.RequestedOutput(name="y", binary=True)],
    )
    request.parameters["priority"].int64_value = 3
    return request


@pytest.mark.parametrize("version", ["", "2"])
def test_model_and_version_are_read_from_the_wire(version: str) -> None:
    parsed = SerializedRequest.parse(_request(version).SerializeToString())
    assert (parsed.model, parsed.version) == ("digits", version)


def test_a_new_version_is_appended_and_wins_while_the_rest_stays() -> None:
    original = _request("1")
    serialized = SerializedRequest.of(original)
    assert serialized.for_version("1") is serialized.data
    forwarded = pb.InferRequest.FromString(serialized.for_version("7"))
    assert forwarded.model_version == "7"
    forwarded.model_version = "1"
    assert forwarded == original
    assert SerializedRequest.parse(serialized.for_version("7")).version == "7"


@pytest.mark.parametrize("garbage", [b"\x0a\x10dig", b"\x0a\x02\xff\xfe", b"\x0f", b"\x80"])
def test_bytes_that_are_no_request_are_invalid_arguments(garbage: bytes) -> None:
    with pytest.raises(InvalidArgument):
        SerializedRequest.parse(garbage)
