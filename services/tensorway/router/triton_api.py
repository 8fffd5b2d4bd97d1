"""Triton's own `inference.GRPCInferenceService`, served by the router so `tritonclient.grpc` code
works against the mesh unchanged, answered as Triton answers.

Inference goes through the router's core as the bytes the client sent: the router reads the model,
version, id and parameters off the wire (`SerializedRequest.parse_triton`) and forwards the
message to the orchestrators' own `ModelInfer`, which validates it against the model and hands it
to Triton as it is, so a Triton request is never converted to tensorway's message and back, and
its answer comes back as Triton's bytes. A stream's messages go one by one the same way, and
their answers are wrapped for the stream on the wire. Health, metadata and readiness are answered from the
route table. What only Tritons know comes from the orchestrators of the version's pool, which
serve Triton's service for it (`tensorway.orchestrator.triton_control`): a model's configuration
(a serving Triton's, verbatim, cached per version until the route table changes), its
statistics (summed over every Triton that serves the version, each Triton counted once however
many orchestrators front it) and the repository's states and reasons.

Triton semantics clients rely on are kept: an unknown model is NOT_FOUND (and not ready rather
than an error for ModelReady), a version string Triton cannot read as a number is
INVALID_ARGUMENT, statistics of a model or version that is not served are INVALID_ARGUMENT,
shapes in metadata carry the batch dimension as -1, outputs come back as raw buffers, unary
answers carry no parameters of the mesh's own and stream answers carry Triton's
`triton_final_response`, a failed request on a stream is an `error_message` while the stream
goes on, and a stream's answers come back in the order its requests came. A decoupled model
(known from its Triton configuration) answers each request of a stream with its whole series,
final flags and Triton's empty final answer (when asked for) as Triton sends them, and a unary
ModelInfer on it is refused with Triton's UNIMPLEMENTED and Triton's words. Refusals keep Triton's
status codes but carry the mesh's own messages.

What a mesh cannot do as one Triton does is refused with a message saying why: shared memory
(UNIMPLEMENTED: the router and the Tritons run in other processes, usually on other machines, so
no client memory region can be mapped) and unloading a model (FAILED_PRECONDITION: the registry's
deployments decide what is served). Loading a model is answered from its deployment: OK when it
is served, UNAVAILABLE while it is not. Both need the admin scope (`models.write`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import timedelta
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from tensorway.common.v1 import error_pb2, tensor_pb2
from tensorway.orchestrator.streams import FINAL_RESPONSE_PARAMETER
from tensorway.orchestrator.triton_control import TRITONS_METADATA_KEY
from tensorway.orchestrator.triton_errors import UNARY_ON_DECOUPLED
from tensorway.orchestrator.validation import NO_SHARED_MEMORY
from tensorway.router.dispatch import Router, status_of
from tensorway.router.routing import ModelRoute, RouteTable, VersionRoute, route_key
from tensorway.router.serialized import SerializedRequest
from tensorway.runtime import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from tensorway.runtime.context import Scope, require_scope
from tensorway.runtime.interceptors import downstream_metadata, downstream_timeout
from tensorway.runtime.streams import answer_series_in_order
from tensorway.tensors import wire

SERVICE = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
_STREAM_ANSWER = triton.ModelStreamInferResponse.INFER_RESPONSE_FIELD_NUMBER
# Where a decoupled model's requests go: the orchestrator's stream, one request per call.
_ORCHESTRATOR_STREAM = f"/{SERVICE.full_name}/ModelStreamInfer"
# Appended to a serialized ModelInferResponse, this map entry adds Triton's final-response flag to
# its parameters (map entries on the wire merge into the map).
_FINAL_RESPONSE = triton.ModelInferResponse(
    parameters={FINAL_RESPONSE_PARAMETER: triton.InferParameter(bool_param=True)}
).SerializeToString()
# What ServerMetadata says: Triton's name and the version of Triton the mesh fronts and is tested
# against, so clients that check the server accept it; and of Triton 2.51's extensions, those the
# mesh serves as Triton does. Left out: shared memory (system, CUDA), trace and log settings, and
# unloading dependents, which the mesh refuses.
SERVER_NAME = "triton"
SERVER_VERSION = "2.51.0"
EXTENSIONS = (
    "classification",
    "sequence",
    "model_repository",
    "schedule_policy",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
)
NOT_THROUGH_THE_MESH = (
    "Triton's log and trace settings are each Triton's own and are not set through tensorway: set "
    "them where each Triton runs; the mesh's own logs and traces are set by its services' settings"
)
# Orchestrator answers the control RPCs pass over to the next orchestrator: it is away, or
# older than the Triton service it serves.
_PASS_OVER = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# Triton reads a version string with C++ stol: leading whitespace, a sign and digits, the rest
# ignored; it refuses a string with no number and a negative number.
_VERSION_NUMBER = re.compile(r"\s*([+-]?\d+)")
_INT64_MAX = 2**63 - 1


def _with_batch_dimension(shape: Iterable[int], max_batch_size: int) -> list[int]:
    return [-1, *shape] if max_batch_size > 0 else list(shape)


def _tensor_metadata(
    specs: Iterable[tensor_pb2.TensorSpec], max_batch_size: int
) -> list[triton.ModelMetadataResponse.TensorMetadata]:
    return [
        triton.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=spec.datatype, shape=_with_batch_dimension(spec.shape, max_batch_size)
        )
        for spec in specs
    ]


def version_number(version: str) -> int | None:
    """The number Triton reads from a version string; None where Triton refuses the string
    (INVALID_ARGUMENT), as for "abc" or "-1"."""
    match = _VERSION_NUMBER.match(version)
    if match is None:
        return None
    number = int(match[1])
    return number if 0 <= number <= _INT64_MAX else None


def _not_available(model: str, version: str) -> InvalidArgument:
    # Triton's code for statistics of a model or version it does not serve.
    described = f"model {model!r}" + (f" version {version}" if version else "")
    return InvalidArgument(
        f"{described} is not available",
        reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND,
        metadata={"model": model},
    )


def add_statistics(total: triton.ModelStatistics, part: triton.ModelStatistics) -> None:
    """Add one Triton's ModelStatistics of a model version to `total`: counts and durations
    summed, batch and response statistics by batch size and by key, the latest inference kept."""
    total.last_inference = max(total.last_inference, part.last_inference)
    total.inference_count += part.inference_count
    total.execution_count += part.execution_count
    _add_durations(total.inference_stats, part.inference_stats)
    batches = {batch.batch_size: batch for batch in total.batch_stats}
    for batch in part.batch_stats:
        if batch.batch_size not in batches:
            batches[batch.batch_size] = total.batch_stats.add(batch_size=batch.batch_size)
        _add_durations(batches[batch.batch_size], batch, skip=("batch_size",))
    memory = {(usage.type, usage.id): usage for usage in total.memory_usage}
    for usage in part.memory_usage:
        if (usage.type, usage.id) not in memory:
            memory[(usage.type, usage.id)] = total.memory_usage.add(type=usage.type, id=usage.id)
        memory[(usage.type, usage.id)].byte_size += usage.byte_size
    for key, response in part.response_stats.items():
        _add_durations(total.response_stats[key], response)


def _add_durations(total: Message, part: Message, skip: Iterable[str] = ()) -> None:
    """Add every StatisticDuration field of `part` to `total`'s."""
    for field in part.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        into, added = getattr(total, field.name), getattr(part, field.name)
        into.count += added.count
        into.ns += added.ns


class TritonServicer:
    """Thin: convert the request, call the router (or the orchestrators), convert the answer.

    Raises the mesh's errors and never touches the call's context beyond its metadata, so the
    V2 HTTP door (`http_api`) can call it too.
    """

    def __init__(
        self,
        router: Router,
        route_key_header: str,
        stream_max_in_flight: int,
        control_timeout: timedelta = timedelta(seconds=5),
    ) -> None:
        self._router = router
        self._route_key_header = route_key_header
        self._stream_max_in_flight = stream_max_in_flight
        self._control_timeout = control_timeout.total_seconds()
        # Triton's configuration of each (model, version), for the route table it was fetched under.
        self._configs: dict[tuple[str, str], triton.ModelConfigResponse] = {}
        self._configs_table: RouteTable | None = None
        # Whether each (model, version string) a request names is decoupled, for the same table as
        # the configurations: every inference asks, and a lookup here skips resolving the route
        # and building a ModelConfigRequest per request.
        self._decoupled: dict[tuple[str, str], bool] = {}

    # Health and server metadata.

    async def ServerLive(
        self, request: triton.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ServerLiveResponse:
        return triton.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: triton.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ServerReadyResponse:
        return triton.ServerReadyResponse(ready=self._router.loaded)

    async def ServerMetadata(
        self, request: triton.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ServerMetadataResponse:
        return triton.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    # Models.

    async def ModelReady(
        self, request: triton.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ModelReadyResponse:
        try:
            route, version = self._routed(request.name, request.version)
            _, chosen = self._router.describe(route.model, version)
        except NotFound:
            return triton.ModelReadyResponse(ready=False)
        return triton.ModelReadyResponse(ready=self._router.serviceable(chosen))

    async def ModelMetadata(
        self, request: triton.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ModelMetadataResponse:
        route, version = self._routed(request.name, request.version)
        route, chosen = self._router.describe(route.model, version)
        return triton.ModelMetadataResponse(
            name=route.model,
            versions=list(route.versions),
            platform=chosen.platform,
            inputs=_tensor_metadata(chosen.inputs, chosen.max_batch_size),
            outputs=_tensor_metadata(chosen.outputs, chosen.max_batch_size),
        )

    async def ModelConfig(
        self, request: triton.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ModelConfigResponse:
        route, version = self._routed(request.name, request.version)
        route, chosen = self._router.describe(route.model, version)
        table = self._router.table
        self._forget_configs_of_older_tables(table)
        key = (route.model, chosen.version)
        config = self._configs.get(key)
        if config is None:
            config = await self._first_answer(
                chosen, "ModelConfig", triton.ModelConfigRequest(name=route.model, version=chosen.version)
            )
            if self._configs_table is table:
                self._configs[key] = config
        return config

    async def ModelStatistics(
        self, request: triton.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ModelStatisticsResponse:
        # Which versions to report, and which orchestrators serve each.
        # (model, version) asked of each orchestrator, "" for all.
        wanted: dict[tuple[str, str], VersionRoute] = {}
        asked = ("", "")
        if request.name:
            try:
                route, version = self._routed(request.name, request.version)
                if version:
                    _, chosen = self._router.describe(route.model, version)
                    wanted[(route.model, chosen.version)] = chosen
                    asked = (route.model, chosen.version)
                else:
                    wanted.update(((route.model, name), each) for name, each in route.versions.items())
                    asked = (route.model, "")
            except NotFound as unknown:
                raise _not_available(request.name, request.version) from unknown
        else:
            for route in self._router.table.models.values():
                wanted.update(((route.model, name), each) for name, each in route.versions.items())
        served_by: dict[str, set[tuple[str, str]]] = {}
        for key, version_route in wanted.items():
            for address in version_route.endpoints:
                served_by.setdefault(address, set()).add(key)
        answers = await asyncio.gather(
            *(self._statistics_of(address, *asked) for address in served_by), return_exceptions=True
        )
        totals = {key: triton.ModelStatistics(name=key[0], version=key[1]) for key in sorted(wanted)}
        counted: set[tuple[str, str, str]] = set()
        failures: list[BaseException] = []
        for address, answer in zip(served_by, answers, strict=True):
            if isinstance(answer, BaseException):
                failures.append(answer)
                continue
            for triton_address, statistics in answer:
                key = (statistics.name, statistics.version)
                # Each Triton once, however many orchestrators front it.
                if key in served_by[address] and (triton_address, *key) not in counted:
                    counted.add((triton_address, *key))
                    add_statistics(totals[key], statistics)
        if served_by and len(failures) == len(served_by):
            _raise_control_failure(failures, "statistics")
        return triton.ModelStatisticsResponse(model_stats=list(totals.values()))

    # The repository.

    async def RepositoryIndex(
        self, request: triton.RepositoryIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.RepositoryIndexResponse:
        if request.repository_name:
            raise NotFound("repository", request.repository_name)
        table = self._router.table
        states = await self._states(table.models.values())
        index = triton.RepositoryIndexResponse()
        for (model, version), (state, reason) in sorted(states.items()):
            if state == "READY" or not request.ready:
                index.models.add(name=model, version=version, state=state, reason=reason)
        return index

    async def RepositoryModelLoad(
        self, request: triton.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.RepositoryModelLoadResponse:
        require_scope(Scope.MODELS_WRITE)
        if request.repository_name:
            raise NotFound("repository", request.repository_name)
        if request.parameters:
            raise FailedPrecondition(
                "the mesh loads models as the registry's deployments say, from their registered "
                "versions: a load cannot carry a configuration or files; register a model version "
                "and deploy it instead",
                metadata={"model": request.model_name},
            )
        route = self._router.table.model(request.model_name)
        states = await self._states([route])
        if any(state == "READY" for state, _ in states.values()):
            return triton.RepositoryModelLoadResponse()
        reasons = "; ".join(
            f"version {version}: {reason}" for (_, version), (_, reason) in sorted(states.items())
        )
        raise Unavailable(
            f"model {route.model!r} is deployed but no version of it is ready yet ({reasons}); the "
            "orchestrators of its pool load it as its deployment says: try again shortly, or check "
            "the model's deployments in the registry",
            reason=error_pb2.ERROR_REASON_MODEL_NOT_READY,
            metadata={"model": route.model},
        )

    async def RepositoryModelUnload(
        self, request: triton.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.RepositoryModelUnloadResponse:
        require_scope(Scope.MODELS_WRITE)
        raise FailedPrecondition(
            f"the mesh serves models by the registry's deployments, not by Triton's model control, "
            f"so it does not unload model {request.model_name!r}: to stop serving it, change or "
            "delete its deployments in the registry (RegistryService.UpdateDeployment / "
            "DeleteDeployment), and the orchestrators of its pool unload it",
            metadata={"model": request.model_name},
        )

    # Shared memory: refused, a mesh cannot map a client's memory; Triton's log and trace
    # settings are each Triton's own, set where it runs, not through the mesh.

    async def _no_shared_memory(
        self, request: Message, context: grpc.aio.ServicerContext[Any, Any]
    ) -> NoReturn:
        raise Unimplemented(NO_SHARED_MEMORY)

    SystemSharedMemoryStatus = SystemSharedMemoryRegister = SystemSharedMemoryUnregister = _no_shared_memory
    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = _no_shared_memory

    async def _not_through_the_mesh(
        self, request: Message, context: grpc.aio.ServicerContext[Any, Any]
    ) -> NoReturn:
        raise Unimplemented(NOT_THROUGH_THE_MESH)

    LogSettings = TraceSetting = _not_through_the_mesh

    # Inference.

    async def ModelInfer(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """The serialized ModelInferRequest forwarded as it came; the orchestrator's serialized
        answer, which carries no parameters of the mesh's own, returned as it came. Refused for a
        decoupled model, as Triton refuses it (before an orchestrator would, so that the client's
        mistake never counts against an endpoint)."""
        parsed = SerializedRequest.parse_triton(request)
        if await self.decoupled(parsed.model, parsed.version):
            raise Unimplemented(UNARY_ON_DECOUPLED)
        return await self._infer(parsed, route_key(context, self._route_key_header))

    async def decoupled(self, model: str, version: str) -> bool:
        """Whether a model version answers a request with a series (Triton's decoupled
        transaction policy), by the configuration of a Triton serving it; a version string that
        names no version asks about the version metadata calls describe."""
        table = self._router.table
        self._forget_configs_of_older_tables(table)
        known = self._decoupled.get((model, version))
        if known is not None:
            return known
        try:
            answer = await self.ModelConfig(triton.ModelConfigRequest(name=model, version=version), _NO_CALL)
        except (Unavailable, grpc.aio.AioRpcError):
            # No orchestrator tells (away, or older than Triton's service): the request goes as one
            # that is not, and an orchestrator that knows better refuses it.
            return False
        decoupled = bool(answer.config.model_transaction_policy.decoupled)
        route = table.models.get(model)
        # Only the version strings the table names are remembered (no version, a version, an
        # alias), so callers cannot grow the map with spellings of numbers ("01", " 1").
        if (
            self._configs_table is table
            and route is not None
            and (not version or version in route.versions or version in route.aliases)
        ):
            self._decoupled[(model, version)] = decoupled
        return decoupled

    def _forget_configs_of_older_tables(self, table: RouteTable) -> None:
        if table is not self._configs_table:
            # A new table may route the version elsewhere, to Tritons with another configuration.
            self._configs, self._decoupled, self._configs_table = {}, {}, table

    async def infer_message(
        self, request: triton.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triton.ModelInferResponse:
        """ModelInfer on messages, for doors that build them (the V2 HTTP door)."""
        answer = await self.ModelInfer(request.SerializeToString(), context)
        return triton.ModelInferResponse.FromString(answer)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Each serialized ModelInferRequest of the stream forwarded as ModelInfer, or for a
        decoupled model on the orchestrator's ModelStreamInfer, whose every answer (Triton's, with
        its final flag) comes back as it came; answers in request order as serialized
        ModelStreamInferResponses."""
        key = route_key(context, self._route_key_header)

        async def answers(request: SerializedRequest | BaseException) -> AsyncIterator[bytes]:
            if isinstance(request, BaseException):
                yield _stream_error(request, "")
                return
            try:
                if await self.decoupled(request.model, request.version):
                    _, version = self._routed(request.model, request.version)
                    async for answer in self._router.infer_series(
                        request.with_version(version), key, _ORCHESTRATOR_STREAM, bidi=True
                    ):
                        yield answer
                    return
                response = await self._infer(request, key)
            except Exception as error:
                yield _stream_error(error, request.id)
                return
            # Triton marks each answer on a stream as its request's final one.
            yield wire.message_field(_STREAM_ANSWER, response + _FINAL_RESPONSE)

        async def parsed() -> AsyncIterator[SerializedRequest | BaseException]:
            async for request in request_iterator:
                try:
                    yield SerializedRequest.parse_triton(request)
                except InvalidArgument as error:
                    yield error

        def sequence_of(request: SerializedRequest | BaseException) -> tuple[str, str] | None:
            if isinstance(request, BaseException) or request.sequence is None:
                return None
            return (request.model, request.sequence.id)

        async for response in answer_series_in_order(
            parsed(), answers, self._stream_max_in_flight, sequence_of
        ):
            yield response

    async def _infer(self, request: SerializedRequest, key: str | None) -> bytes:
        """Route a Triton request by its model and version, the version read as Triton reads it
        (appended to the bytes when the reading differs from the string sent, as "01" names "1")."""
        _, version = self._routed(request.model, request.version)
        return await self._router.infer(request.with_version(version), key)

    # Helpers.

    def _routed(self, model: str, version: str) -> tuple[ModelRoute, str]:
        """The model's route and the version string to look up in it, read as Triton reads it.

        A version the route names, or one of its aliases, stands as it is; otherwise the string
        must hold a number as Triton's do (INVALID_ARGUMENT, before the model is looked up, as
        Triton does), and "01" or " 1" name version "1". NOT_FOUND for a model the table lacks.
        """
        table = self._router.table
        route = table.models.get(model)
        if version and not (route is not None and (version in route.versions or version in route.aliases)):
            number = version_number(version)
            if number is None:
                raise InvalidArgument(
                    f"version {version!r} is not a version number: a version is an integer above 0",
                    [FieldViolation("version", "must be an integer above 0")],
                    reason=error_pb2.ERROR_REASON_INVALID_ARGUMENT,
                    metadata={"model": model},
                )
            version = str(number)
        return table.model(model), version

    def _channel(self, address: str) -> triton_grpc.GRPCInferenceServiceAsyncStub:
        return triton_grpc.GRPCInferenceServiceStub(self._router.endpoints.get(address).channel)

    async def _first_answer(self, version: VersionRoute, method: str, request: Any) -> Any:
        """The first answer to a control call from the version's orchestrators, available ones
        first; a refusal of the request itself (NOT_FOUND, INVALID_ARGUMENT) is final."""
        endpoints = sorted(
            self._router.endpoints.of(version.endpoints),
            key=lambda endpoint: not endpoint.breaker.available(),
        )
        failures: list[BaseException] = []
        for endpoint in endpoints:
            try:
                return await getattr(self._channel(endpoint.address), method)(
                    request, timeout=downstream_timeout(self._control_timeout), metadata=downstream_metadata()
                )
            except grpc.aio.AioRpcError as error:
                if error.code() not in _PASS_OVER:
                    raise
                failures.append(error)
        _raise_control_failure(failures, f"version {version.version} (pool {version.pool})")

    async def _statistics_of(
        self, address: str, model: str, version: str
    ) -> list[tuple[str, triton.ModelStatistics]]:
        """(Triton address, ModelStatistics) for each Triton behind the orchestrator at `address`."""
        call = self._channel(address).ModelStatistics(
            triton.ModelStatisticsRequest(name=model, version=version),
            timeout=downstream_timeout(self._control_timeout),
            metadata=downstream_metadata(),
        )
        answer = await call
        trailing = dict(await call.trailing_metadata() or ())
        tritons = str(trailing.get(TRITONS_METADATA_KEY, "")).split(",")
        if len(tritons) != len(answer.model_stats):
            # An orchestrator that does not name its Tritons: count its answer as one Triton's.
            tritons = [address] * len(answer.model_stats)
        return list(zip(tritons, answer.model_stats, strict=True))

    async def _index_of(
        self, address: str
    ) -> Mapping[tuple[str, str], triton.RepositoryIndexResponse.ModelIndex]:
        answer = await self._channel(address).RepositoryIndex(
            triton.RepositoryIndexRequest(ready=False),
            timeout=downstream_timeout(self._control_timeout),
            metadata=downstream_metadata(),
        )
        return {(entry.name, entry.version): entry for entry in answer.models}

    async def _states(self, routes: Iterable[ModelRoute]) -> dict[tuple[str, str], tuple[str, str]]:
        """Triton's state and reason of every version of `routes`, from their orchestrators."""
        routes = list(routes)
        addresses = sorted(
            {a for route in routes for version in route.versions.values() for a in version.endpoints}
        )
        answers = await asyncio.gather(
            *(self._index_of(address) for address in addresses), return_exceptions=True
        )
        indexes = {
            address: answer
            for address, answer in zip(addresses, answers, strict=True)
            if not isinstance(answer, BaseException)
        }
        return {
            (route.model, name): self._state_of(route.model, version, indexes)
            for route in routes
            for name, version in route.versions.items()
        }

    def _state_of(
        self,
        model: str,
        version: VersionRoute,
        indexes: Mapping[str, Mapping[tuple[str, str], triton.RepositoryIndexResponse.ModelIndex]],
    ) -> tuple[str, str]:
        if not version.endpoints:
            return "UNAVAILABLE", f"pool {version.pool} has no orchestrators"
        reported = [
            (address, indexes[address].get((model, version.version)))
            for address in version.endpoints
            if address in indexes
        ]
        ready = [address for address, entry in reported if entry is not None and entry.state == "READY"]
        if any(self._router.endpoints.get(address).breaker.available() for address in ready):
            return "READY", ""
        if ready:
            return "UNAVAILABLE", f"the router holds pool {version.pool}'s orchestrators out after failures"
        for _, entry in reported:
            if entry is not None:
                return entry.state or "UNAVAILABLE", entry.reason
        if reported:
            return "UNAVAILABLE", f"not in the model repository of pool {version.pool}"
        return "UNAVAILABLE", f"no orchestrator of pool {version.pool} answered"


# ModelConfig reads nothing of its call, so the router can ask it for its own ends.
_NO_CALL: Any = None


def _stream_error(error: BaseException, request_id: str) -> bytes:
    """A failed request's answer on a stream, as Triton gives it: the message, and of the answer
    only the request's id."""
    answer: bytes = triton.ModelStreamInferResponse(
        error_message=status_of(error).message,
        infer_response=triton.ModelInferResponse(id=request_id),
    ).SerializeToString()
    return answer


def add_to_server(servicer: TritonServicer, server: grpc.aio.Server) -> None:
    """The generated `add_GRPCInferenceServiceServicer_to_server`, except that inference's
    requests and answers stay serialized."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        behaviour = getattr(servicer, method.name)
        if method.name == "ModelInfer":
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(behaviour)
        elif method.name == "ModelStreamInfer":
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behaviour)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=getattr(triton, method.input_type.name).FromString,
                response_serializer=getattr(triton, method.output_type.name).SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _raise_control_failure(failures: list[BaseException], what: str) -> NoReturn:
    """Every orchestrator failed a control call: raise their own refusal of the request (its
    code and message, the mesh's, pass on as they are), else UNAVAILABLE."""
    for failure in failures:
        if not isinstance(failure, grpc.aio.AioRpcError) or failure.code() not in _PASS_OVER:
            raise failure
    raise Unavailable(f"no orchestrator answered for {what}", reason=error_pb2.ERROR_REASON_MODEL_NOT_READY)
