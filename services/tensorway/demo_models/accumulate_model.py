"""Stateful Triton Python-backend model: the running sum of each sequence's INT32 inputs.

This file never runs in the tensorway process: `build_repository` copies it into the
``accumulate`` model's version directory as ``model.py``, and Triton's Python-backend stub loads
it there. It is self-contained for that reason.

Triton's sequence batcher (``sequence_batching`` in config.pbtxt) sends every request of a
sequence to this instance, in order, and fills in the control inputs from the request's
``sequence_id``, ``sequence_start`` and ``sequence_end`` parameters: START and END (1 on the
sequence's first and last request), READY (0 on a slot with no request) and CORRID (the sequence
id). The state is the sum so far of each live sequence; START resets it, END forgets it.
"""

from typing import Any

import numpy as np
import numpy.typing as npt

# Triton's stub process provides this module; it cannot be installed, so mypy sees it
# as Any and the rest of this file is still type-checked.
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

Array = npt.NDArray[Any]


def _flag(request: Any, name: str) -> bool:
    return bool(pb_utils.get_input_tensor_by_name(request, name).as_numpy().ravel()[0])


class TritonPythonModel:
    """The Python backend's entry point: one instance, holding the state of every live sequence."""

    def initialize(self, args: dict[str, str]) -> None:
        self._sums: dict[int, np.int32] = {}

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._step(request) for request in requests]

    def _step(self, request: Any) -> Any:
        values: Array = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
        if not _flag(request, "READY"):
            # An empty slot of a batch: nothing to add, and no one reads the answer.
            return pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("OUTPUT", np.zeros_like(values))]
            )
        sequence = int(pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy().ravel()[0])
        start = np.int32(0) if _flag(request, "START") else self._sums.get(sequence, np.int32(0))
        # The sum after each element, in order; int32 wraps as Triton's own example models do.
        running = (np.cumsum(values.ravel(), dtype=np.int64) + int(start)).astype(np.int32)
        if _flag(request, "END"):
            self._sums.pop(sequence, None)
        else:
            self._sums[sequence] = running[-1] if running.size else start
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("OUTPUT", running.reshape(values.shape))]
        )
