"""Triton Python-backend model that fails every fifth request: ``simple``'s signature and
answers (OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1), with an error answer for the
5th, 10th, 15th... request it executes, so 20% of its traffic fails, deterministically.

It stands for a bad new version in the measured-rollout tests, which copy it into a Triton
repository as ``model.py`` beside a config.pbtxt of ``simple``'s shape. It is not one of the
demo models `build_repository` writes: nothing routes to it unless a test does. Self-contained,
since it runs inside Triton's stub process.
"""

from typing import Any

import numpy as np

# Triton's stub process provides this module; it cannot be installed, so mypy sees it
# as Any and the rest of this file is still type-checked.
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

FAILING_EVERY = 5


class TritonPythonModel:
    """The Python backend's entry point: counts requests and fails each FAILING_EVERY-th."""

    def initialize(self, args: dict[str, str]) -> None:
        self._requests = 0

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._answer(request) for request in requests]

    def _answer(self, request: Any) -> Any:
        self._requests += 1
        if self._requests % FAILING_EVERY == 0:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(
                    f"request {self._requests} fails on purpose (one in {FAILING_EVERY})"
                )
            )
        left = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
        right = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("OUTPUT0", (left + right).astype(np.int32)),
                pb_utils.Tensor("OUTPUT1", (left - right).astype(np.int32)),
            ]
        )
