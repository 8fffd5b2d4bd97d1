"""The seam between batch workers and the mesh: whatever serves `tensorway.inference.v1`.

Workers take an `InferenceClient`; production hands them `GrpcInferenceClient` on a channel to
the router, tests may hand in any server of the same contract.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Protocol

import grpc

from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tensorway.runtime import create_channel
from tensorway.runtime.errors import RETRYABLE_CODES
from tensorway.tensors.signatures import ModelSignature

# Codes after which a worker sends the same request again: the mesh says it may well succeed,
# or the attempt merely ran out of its own time (each attempt has a deadline of its own).
ATTEMPT_AGAIN_CODES = RETRYABLE_CODES | {grpc.StatusCode.DEADLINE_EXCEEDED}


class InferenceClient(Protocol):
    """What a batch worker needs from the mesh."""

    async def signature(self, model: str, version: str) -> ModelSignature:
        """The model's signature; raises grpc.aio.AioRpcError (NOT_FOUND for an unknown model)."""
        ...

    async def infer(self, request: pb.InferRequest) -> pb.InferResponse:
        """Run one (batched) request; raises grpc.aio.AioRpcError."""
        ...


class GrpcInferenceClient:
    """`InferenceClient` over a gRPC channel to a router (or anything serving the contract)."""

    def __init__(self, channel: grpc.aio.Channel, timeout: timedelta) -> None:
        self._channel = channel
        self._stub = pb_grpc.InferenceServiceStub(channel)
        self._timeout = timeout.total_seconds()

    @classmethod
    def connect(cls, target: str, timeout: timedelta) -> GrpcInferenceClient:
        return cls(create_channel(target), timeout)

    async def signature(self, model: str, version: str) -> ModelSignature:
        response = await self._stub.GetModelMetadata(
            pb.GetModelMetadataRequest(model_name=model, model_version=version), timeout=self._timeout
        )
        return ModelSignature.from_metadata(response)

    async def infer(self, request: pb.InferRequest) -> pb.InferResponse:
        response: pb.InferResponse = await self._stub.Infer(request, timeout=self._timeout)
        return response

    async def close(self) -> None:
        await self._channel.close()


async def infer_with_retries(
    client: InferenceClient, request: pb.InferRequest, attempts: int, backoff: timedelta
) -> pb.InferResponse:
    """`client.infer`, retried with exponential backoff while the failure is a transient one."""
    attempt = 1
    while True:
        try:
            return await client.infer(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in ATTEMPT_AGAIN_CODES or attempt >= attempts:
                raise
        await asyncio.sleep(backoff.total_seconds() * 2 ** (attempt - 1))
        attempt += 1
