"""Triton's own `inference.GRPCInferenceService`, served by the router so `tritonclient.grpc` code
works against the mesh unchanged. Inference goes through the router's core; health, metadata,
configuration and the repository index are answered from the route table.

Triton semantics clients rely on are kept: an unknown model is NOT_FOUND (and not ready rather
than an error for ModelReady), shapes in metadata carry the batch dimension as -1, outputs come
back as raw buffers, a failed request on a stream is an `error_message` while the stream goes on,
and a stream's answers come back in the order its requests came.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from importlib import metadata
from typing import Any

import grpc
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.router.dispatch import Router
from tensorway.router.routing import VersionRoute
from tensorway.router.serialized import SerializedRequest
from tensorway.router.streaming import answer_in_order, route_key, status_of
from tensorway.runtime import NotFound, TensorwayError
from tensorway.tensors.triton import from_triton_request, to_triton_response

SERVICE = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
add_to_server = triton_grpc.add_GRPCInferenceServiceServicer_to_server
SERVER_NAME = "tensorway"
# What the router does the way Triton does; shared memory, statistics and model control stay with
# the orchestrators' Tritons.
EXTENSIONS = ("classification", "model_configuration", "parameters")


def _with_batch_dimension(shape: Iterable[int], max_batch_size: int) -> list[int]:
    return [-1, *shape] if max_batch_size > 0 else list(shape)


def _tensor_metadata(specs: Iterable[tensor_pb2.TensorSpec], max_batch_size: int) -> list[Any]:
    return [
        triton.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=spec.datatype, shape=_with_batch_dimension(spec.shape, max_batch_size)
        )
        for spec in specs
    ]


def _config_type(datatype: str) -> Any:
    # Triton's configuration calls BYTES "TYPE_STRING"; every other name only gains the prefix.
    return triton_config.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _model_config(model: str, version: VersionRoute) -> Any:
    return triton_config.ModelConfig(
        name=model,
        platform=version.platform,
        max_batch_size=version.max_batch_size,
        input=[
            triton_config.ModelInput(name=spec.name, data_type=_config_type(spec.datatype), dims=spec.shape)
            for spec in version.inputs
        ],
        output=[
            triton_config.ModelOutput(name=spec.name, data_type=_config_type(spec.datatype), dims=spec.shape)
            for spec in version.outputs
        ],
    )


def _sequence_of(request: Any) -> tuple[str, str] | None:
    """The (model, sequence id) of a Triton request in a stateful sequence; None outside one."""
    parameter = request.parameters.get("sequence_id")
    if parameter is None:
        return None
    kind = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, kind) if kind in ("int64_param", "uint64_param", "string_param") else None
    return (request.model_name, str(value)) if value else None


class TritonServicer(triton_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Thin: convert the request, call the router, convert the answer."""

    def __init__(self, router: Router, route_key_header: str, stream_max_in_flight: int) -> None:
        self._router = router
        self._route_key_header = route_key_header
        self._stream_max_in_flight = stream_max_in_flight

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return triton.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return triton.ServerReadyResponse(ready=self._router.loaded)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            _, version = self._router.describe(request.name, request.version)
        except TensorwayError:
            return triton.ModelReadyResponse(ready=False)
        return triton.ModelReadyResponse(ready=self._router.serviceable(version))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return triton.ServerMetadataResponse(
            name=SERVER_NAME, version=metadata.version("tensorway"), extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        route, version = self._router.describe(request.name, request.version)
        return triton.ModelMetadataResponse(
            name=route.model,
            versions=list(route.versions),
            platform=version.platform,
            inputs=_tensor_metadata(version.inputs, version.max_batch_size),
            outputs=_tensor_metadata(version.outputs, version.max_batch_size),
        )

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        route, version = self._router.describe(request.name, request.version)
        return triton.ModelConfigResponse(config=_model_config(route.model, version))

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request.repository_name:
            raise NotFound("repository", request.repository_name)
        index = triton.RepositoryIndexResponse()
        for route in self._router.table.models.values():
            for version in route.versions.values():
                ready = self._router.serviceable(version)
                if ready or not request.ready:
                    index.models.add(
                        name=route.model, version=version.version, state="READY" if ready else "UNAVAILABLE"
                    )
        return index

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._infer(request, route_key(context, self._route_key_header))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        key = route_key(context, self._route_key_header)

        async def answer(request: Any) -> Any:
            try:
                return triton.ModelStreamInferResponse(infer_response=await self._infer(request, key))
            except Exception as error:
                return triton.ModelStreamInferResponse(
                    error_message=status_of(error).message,
                    infer_response=triton.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version, id=request.id
                    ),
                )

        async for response in answer_in_order(
            request_iterator, answer, self._stream_max_in_flight, _sequence_of
        ):
            yield response

    async def _infer(self, request: Any, key: str | None) -> Any:
        # Resolved here first: a request naming no outputs asks for the chosen version's outputs.
        _, version = self._router.resolve(request.model_name, request.model_version, key)
        converted = from_triton_request(request, version.outputs)
        converted.model_version = version.version
        response = await self._router.infer(SerializedRequest.of(converted), key)
        return to_triton_response(pb.InferResponse.FromString(response), request.id)
