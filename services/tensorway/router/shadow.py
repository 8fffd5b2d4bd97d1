"""Shadow traffic: copies of requests run on a second version, compared with the primary's answers
and counted in metrics. A shadow answer is never returned and never delays the primary."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import numpy as np

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.router import metrics
from tensorway.router.routing import ModelRoute, VersionRoute
from tensorway.router.serialized import SerializedRequest

logger = logging.getLogger(__name__)

# Serialized InferRequest in, serialized InferResponse out, as the router forwards them.
ShadowCall = Callable[[VersionRoute, bytes], Awaitable[bytes]]

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


class ShadowMirror:
    """Starts shadow calls for a share of requests and settles each against the primary's answer."""

    def __init__(self, call: ShadowCall, max_in_flight: int, rng: random.Random) -> None:
        self._call = call
        self._max_in_flight = max_in_flight
        self._rng = rng
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
            self._compare(route.model, target, request.for_version(target.version), primary_answer)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return primary_answer

    async def _compare(
        self,
        model: str,
        target: VersionRoute,
        request: bytes,
        primary_answer: asyncio.Future[bytes | None],
    ) -> None:
        try:
            shadow = await self._call(target, request)
        except Exception as error:
            logger.debug(
                "shadow call failed", extra={"model": model, "version": target.version}, exc_info=error
            )
            metrics.SHADOW.labels(model, target.version, "error").inc()
            return
        primary = await primary_answer
        if primary is not None:
            same = same_outputs(pb.InferResponse.FromString(primary), pb.InferResponse.FromString(shadow))
            outcome = "match" if same else "mismatch"
            metrics.SHADOW.labels(model, target.version, outcome).inc()

    async def close(self) -> None:
        """Cancel shadow calls still running."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
