"""Calling any RPC of the mesh with bytes of the fuzzer's choosing, and judging the outcome."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor
from google.protobuf.message import Message
from google.rpc import code_pb2

from tensorway.registry.access import admin_metadata
from tensorway.runtime.errors import GENERIC_INTERNAL_MESSAGE
from tests.fuzz.conftest import FuzzMesh
from tests.fuzz.outcomes import assert_client_error

# A server stream that is still open after this long is a watch waiting for news, not a hang.
STREAM_PATIENCE = 3.0
UNARY_TIMEOUT = 30.0
# The registry refuses writes from callers without an admin's identity: fuzzed writes carry one,
# so they get past that check to the ones behind it.
REGISTRY_ADMIN = tuple(admin_metadata("fuzz-admin"))


def method_path(method: descriptor.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def call_raw(
    mesh: FuzzMesh,
    service: str,
    method: descriptor.MethodDescriptor,
    requests: list[bytes],
    metadata: Sequence[tuple[str, str]] = (),
) -> list[bytes]:
    """Send serialized `requests` (one unless the method takes a stream) to `service`; the
    serialized answers. A client-error status passes; any other failure fails the test."""
    path = method_path(method)
    with mesh.channel(service) as channel:
        try:
            if not method.client_streaming and not method.server_streaming:
                return [channel.unary_unary(path)(requests[0], timeout=UNARY_TIMEOUT, metadata=metadata)]
            if not method.client_streaming:
                answers: list[bytes] = []
                try:
                    for answer in channel.unary_stream(path)(
                        requests[0], timeout=STREAM_PATIENCE, metadata=metadata
                    ):
                        answers.append(answer)
                except grpc.RpcError as error:
                    if error.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                        raise
                return answers
            return list(channel.stream_stream(path)(iter(requests), timeout=UNARY_TIMEOUT, metadata=metadata))
        except grpc.RpcError as error:
            assert_client_error(error)
            return []
        finally:
            assert not mesh.dead_processes(), f"crashed: {mesh.dead_processes()}"


def call(
    mesh: FuzzMesh,
    service: str,
    method: descriptor.MethodDescriptor,
    requests: list[Message],
    metadata: Sequence[tuple[str, str]] = (),
) -> list[bytes]:
    return call_raw(mesh, service, method, [request.SerializeToString() for request in requests], metadata)


def assert_stream_error_is_clients(status_code: int, message: str) -> None:
    """An error carried inside a stream's answer (google.rpc.Status code, or Triton's message)."""
    assert status_code not in (code_pb2.INTERNAL, code_pb2.UNKNOWN, code_pb2.DATA_LOSS), message
    assert message != GENERIC_INTERNAL_MESSAGE
