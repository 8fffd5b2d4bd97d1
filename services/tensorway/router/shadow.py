"""Shadow traffic: copies of requests run on a second version, compared with the primary's answers
and counted in metrics. A shadow answer is never returned and never delays the primary."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import numpy as np
from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.router import metrics
from tensorway.router.routing import ModelRoute, VersionRoute
from tensorway.router.serialized import TRITON, SerializedRequest, WireApi
from tensorway.tensors.layouts import FIXED_SIZE_DTYPES

logger = logging.getLogger(__name__)

# A serialized request in, its serialized answer out, as the router forwards them; the method
# of the orchestrator that takes the request.
ShadowCall = Callable[[VersionRoute, bytes, str], Awaitable[bytes]]

# Float outputs of two builds of one model rarely agree to the last bit; these do not count as drift.
_FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_RELATIVE_TOLERANCE = 1e-5
_ABSOLUTE_TOLERANCE = 1e-6


def _same_tensor(a: tensor_pb2.Tensor, b: tensor_pb2.Tensor) -> bool:
    if a.datatype != b.datatype or list(a.shape) != list(b.shape):
        return False
    float_type = _FLOAT_TYPES.get(a.datatype)
    if a.raw_contents and b.raw_contents and float_type is not None:
        left = np.frombuffer(a.raw_contents, dtype=float_type)
        right = np.frombuffer(b.raw_contents, dtype=float_type)
        return left.shape == right.shape and bool(
            np.allclose(left, right, rtol=_RELATIVE_TOLERANCE, atol=_ABSOLUTE_TOLERANCE, equal_nan=True)
        )
    return a.raw_contents == b.raw_contents and a.contents == b.contents


def same_outputs(primary: pb.InferResponse, shadow: pb.InferResponse) -> bool:
    """Whether two answers agree: the same outputs, datatypes and shapes, and equal (or close) values."""
    shadow_outputs = {tensor.name: tensor for tensor in shadow.outputs}
    if len(shadow_outputs) != len(primary.outputs):
        return False
    return all(
        tensor.name in shadow_outputs and _same_tensor(tensor, shadow_outputs[tensor.name])
        for tensor in primary.outputs
    )


# Values of each differing output a mismatch sample shows, from each side.
_PREVIEW_VALUES = 8
# Model versions whose sample budget is remembered before expired budgets are forgotten.
_MAX_SAMPLED_VERSIONS = 1024


def read_answer(api: WireApi, answer: bytes) -> pb.InferResponse:
    """A serialized answer of either API as tensorway's InferResponse, to compare: Triton's raw
    output buffers become the outputs' raw contents."""
    if api is not TRITON:
        return pb.InferResponse.FromString(answer)
    response = triton.ModelInferResponse.FromString(answer)
    converted = pb.InferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    raw = response.raw_output_contents
    for index, output in enumerate(response.outputs):
        converted.outputs.add(
            name=output.name,
            datatype=output.datatype,
            shape=output.shape,
            raw_contents=raw[index] if index < len(raw) else b"",
        )
    return converted


def _preview(tensor: tensor_pb2.Tensor | None) -> str:
    """A tensor's datatype, shape and first values, for a log line."""
    if tensor is None:
        return "missing"
    values: list[object] = []
    dtype = FIXED_SIZE_DTYPES.get(tensor.datatype)
    if tensor.raw_contents and dtype is not None:
        count = min(_PREVIEW_VALUES, len(tensor.raw_contents) // dtype.itemsize)
        values = np.frombuffer(tensor.raw_contents, dtype=dtype, count=count).tolist()
    elif tensor.raw_contents:
        values = [tensor.raw_contents[: 4 * _PREVIEW_VALUES]]
    else:
        typed = tensor.contents.ListFields()
        values = list(typed[0][1][:_PREVIEW_VALUES]) if typed else []
    return f"{tensor.datatype}{list(tensor.shape)} {values}"


def differences(primary: pb.InferResponse, shadow: pb.InferResponse) -> dict[str, dict[str, str]]:
    """Each output on which two answers differ, with a preview of either side's."""
    primary_outputs = {tensor.name: tensor for tensor in primary.outputs}
    shadow_outputs = {tensor.name: tensor for tensor in shadow.outputs}
    found = {}
    for name in sorted(primary_outputs.keys() | shadow_outputs.keys()):
        left, right = primary_outputs.get(name), shadow_outputs.get(name)
        if left is None or right is None or not _same_tensor(left, right):
            found[name] = {"primary": _preview(left), "shadow": _preview(right)}
    return found


class MismatchSamples:
    """Which mismatches are logged in full for inspection: at most `per_interval` of each model
    version in each `interval`; the rest are only counted, so a shadow that disagrees on every
    request cannot flood the logs."""

    def __init__(
        self, per_interval: int, interval: timedelta, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_interval = per_interval
        self._interval = interval.total_seconds()
        self._clock = clock
        self._taken: dict[tuple[str, str], tuple[float, int]] = {}

    def take(self, model: str, version: str) -> bool:
        """Whether this mismatch of `version` of `model` is to be kept as a sample."""
        now = self._clock()
        started, taken = self._taken.get((model, version), (now, 0))
        if now - started >= self._interval:
            started, taken = now, 0
        if taken >= self._per_interval:
            return False
        if len(self._taken) >= _MAX_SAMPLED_VERSIONS:
            self._taken = {
                key: value for key, value in self._taken.items() if now - value[0] < self._interval
            }
        self._taken[(model, version)] = (started, taken + 1)
        return True


class ShadowMirror:
    """Starts shadow calls for a share of requests and settles each against the primary's answer.

    Mismatches are counted; a bounded number of them (`samples`) are also logged with the request
    id and the outputs that differ, for someone to look into.
    """

    def __init__(
        self,
        call: ShadowCall,
        max_in_flight: int,
        rng: random.Random,
        samples: MismatchSamples | None = None,
    ) -> None:
        self._call = call
        self._max_in_flight = max_in_flight
        self._rng = rng
        self._samples = samples or MismatchSamples(10, timedelta(minutes=1))
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(
        self, route: ModelRoute, primary: VersionRoute, request: SerializedRequest
    ) -> asyncio.Future[bytes | None] | None:
        """Maybe start a shadow copy of `request`; returns the future to settle with the primary's
        answer (None when the primary failed), or None when no copy was made."""
        target = route.shadow_target()
        if (
            route.shadow is None
            or target is None
            or target.version == primary.version
            or self._rng.random() * 100 >= route.shadow.percent
        ):
            return None
        if len(self._tasks) >= self._max_in_flight:
            metrics.SHADOW.labels(route.model, target.version, "dropped").inc()
            return None
        primary_answer: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._compare(
                route.model, primary.version, target, request.with_version(target.version), primary_answer
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return primary_answer

    async def _compare(
        self,
        model: str,
        primary_version: str,
        target: VersionRoute,
        request: SerializedRequest,
        primary_answer: asyncio.Future[bytes | None],
    ) -> None:
        try:
            shadow = await self._call(target, request.data, request.api.method)
        except Exception as error:
            logger.debug(
                "shadow call failed", extra={"model": model, "version": target.version}, exc_info=error
            )
            metrics.SHADOW.labels(model, target.version, "error").inc()
            return
        primary = await primary_answer
        if primary is None:
            return
        primary_response, shadow_response = (
            read_answer(request.api, primary),
            read_answer(request.api, shadow),
        )
        if same_outputs(primary_response, shadow_response):
            metrics.SHADOW.labels(model, target.version, "match").inc()
            return
        metrics.SHADOW.labels(model, target.version, "mismatch").inc()
        if self._samples.take(model, target.version):
            logger.warning(
                "shadow answer differs from the primary's",
                extra={
                    "model": model,
                    "version": primary_version,
                    "shadow_version": target.version,
                    "request_id": primary_response.id,
                    "differences": differences(primary_response, shadow_response),
                },
            )

    async def close(self) -> None:
        """Cancel shadow calls still running."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
