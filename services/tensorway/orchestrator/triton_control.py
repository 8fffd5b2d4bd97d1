"""Triton's control RPCs for the pool: a model's configuration, its statistics and the repository
index, as the pool's Tritons answer them, served to routers on Triton's own
`inference.GRPCInferenceService` so the router can answer Triton clients as Triton does.

Statistics are answered per Triton, not summed: a Triton may sit behind several orchestrators
(every orchestrator of a pool fronts the pool's Tritons), so only the router, which hears every
orchestrator of a version, can add them up without counting a Triton twice. An answer holds one
`ModelStatistics` per Triton and model version, and its trailing metadata `TRITONS_METADATA_KEY`
names the Triton of each, in the same order, comma-separated.

Refusals keep Triton's status codes (what Triton clients match on) with messages of the mesh's
own, as for inference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import error_pb2
from tensorway.orchestrator.pool import TritonEndpoint, TritonPool
from tensorway.runtime import Internal, InvalidArgument, NotFound, TensorwayError, Unavailable
from tensorway.runtime.errors import GENERIC_INTERNAL_MESSAGE

TRITONS_METADATA_KEY = "x-tensorway-tritons"
"""Trailing metadata of a ModelStatistics answer: the Triton of each entry, comma-separated."""
# A Triton that cannot answer now: another Triton of the pool may.
_PASS_OVER = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


def _described(model: str, version: str) -> str:
    return f"model {model!r}" + (f" version {version}" if version else "")


def _refusal(error: grpc.aio.AioRpcError, model: str, version: str) -> TensorwayError:
    """Triton's refusal of a control call, with Triton's code and the mesh's words."""
    code = error.code()
    metadata = {"model": model} if model else {}
    if code == grpc.StatusCode.NOT_FOUND:
        if version:
            return NotFound(
                "model version",
                f"{model}/{version}",
                reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND,
                metadata=metadata,
            )
        return NotFound("model", model, reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND, metadata=metadata)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # Triton says INVALID_ARGUMENT for statistics of a model or version it has not loaded.
        return InvalidArgument(
            f"{_described(model, version)} is not available on the pool's Tritons",
            reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND,
            metadata=metadata,
        )
    if code in _PASS_OVER:
        return Unavailable(
            f"no Triton of the pool answered for {_described(model, version) if model else 'the pool'}",
            reason=error_pb2.ERROR_REASON_MODEL_NOT_READY,
            metadata=metadata,
        )
    return Internal(GENERIC_INTERNAL_MESSAGE, reason=error_pb2.ERROR_REASON_BACKEND_ERROR, metadata=metadata)


class TritonControl:
    """Answers Triton's control RPCs from the pool's Tritons."""

    def __init__(self, pool: TritonPool) -> None:
        self._pool = pool

    async def model_config(self, model: str, version: str) -> triton.ModelConfigResponse:
        """The ModelConfigResponse of a Triton that has the version ready, verbatim: the Triton
        that requests for the model would go to first, then the others."""
        tried: set[str] = set()
        failures: list[grpc.aio.AioRpcError] = []
        for _ in self._pool.endpoints:
            endpoint = self._pool.choose(model, exclude=tried)
            tried.add(endpoint.address)
            try:
                config: triton.ModelConfigResponse = await endpoint.model_config(model, version)
                return config
            except grpc.aio.AioRpcError as error:
                # NOT_FOUND too: this Triton may not have loaded the model while another has.
                if error.code() not in _PASS_OVER | {grpc.StatusCode.NOT_FOUND}:
                    raise _refusal(error, model, version) from error
                failures.append(error)
        # Triton's own refusal when one refused, else the pool is unreachable.
        failures.sort(key=lambda error: error.code() in _PASS_OVER)
        raise _refusal(failures[0], model, version) from failures[0]

    async def model_statistics(self, model: str, version: str) -> list[tuple[str, triton.ModelStatistics]]:
        """(Triton address, ModelStatistics) for every model version each Triton of the pool
        reports ("" for every model or version); Tritons that do not have it are left out."""
        endpoints = self._pool.endpoints
        answers = await asyncio.gather(
            *(endpoint.model_statistics(model, version) for endpoint in endpoints), return_exceptions=True
        )
        found: list[tuple[str, triton.ModelStatistics]] = []
        refusals: list[grpc.aio.AioRpcError] = []
        for endpoint, answer in zip(endpoints, answers, strict=True):
            if isinstance(answer, grpc.aio.AioRpcError):
                refusals.append(answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                found += [(endpoint.address, entry) for entry in answer.model_stats]
        if found or not refusals:
            return found
        # No Triton has it: Triton's own refusal when one refused, else the pool is unreachable.
        refusals.sort(key=lambda error: error.code() in _PASS_OVER)
        raise _refusal(refusals[0], model, version) from refusals[0]

    async def repository_index(self) -> list[triton.RepositoryIndexResponse.ModelIndex]:
        """Every model version some Triton of the pool knows, once: READY when any Triton has it
        ready, else the state and reason the first Triton to know it gives."""
        endpoints: Sequence[TritonEndpoint] = self._pool.endpoints
        answers = await asyncio.gather(
            *(endpoint.repository_index() for endpoint in endpoints), return_exceptions=True
        )
        merged: dict[tuple[str, str], triton.RepositoryIndexResponse.ModelIndex] = {}
        failures: list[grpc.aio.AioRpcError] = []
        for answer in answers:
            if isinstance(answer, grpc.aio.AioRpcError):
                failures.append(answer)
                continue
            if isinstance(answer, BaseException):
                raise answer
            for entry in answer.models:
                key = (entry.name, entry.version)
                if key not in merged or (entry.state == "READY" and merged[key].state != "READY"):
                    merged[key] = entry
        if failures and len(failures) == len(endpoints):
            raise _refusal(failures[0], "", "") from failures[0]
        return [merged[key] for key in sorted(merged)]


def index_response(
    entries: Sequence[triton.RepositoryIndexResponse.ModelIndex], ready_only: bool
) -> triton.RepositoryIndexResponse:
    """Triton's RepositoryIndexResponse of `entries`, only the READY ones with `ready_only`."""
    return triton.RepositoryIndexResponse(
        models=[entry for entry in entries if entry.state == "READY" or not ready_only]
    )
