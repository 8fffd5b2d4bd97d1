"""Exit 0 when the gRPC server at HOST:PORT says SERVING, else 1.

docker-compose health checks run inside the container, and the runtime image has no
grpc_health_probe; Kubernetes needs none of this (its probes speak gRPC health natively).

    python grpc_health_check.py 127.0.0.1:50051 [SERVICE]
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_SECONDS = 3.0


def check(address: str, service: str = "") -> bool:
    """Whether `address` reports `service` ("" is the whole server) as SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError as error:
            print(f"{address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return False
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(
            f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr
        )
    return serving


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    return 0 if check(*argv[1:]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
