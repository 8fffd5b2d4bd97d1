"""Decoupled Triton Python-backend model: a prompt's words sent back one response at a time, the
way a language model streams its tokens.

This file never runs in the tensorway process: `build_repository` copies it into the ``tokens``
model's version directory as ``model.py``, and Triton's Python-backend stub loads it there. It is
self-contained for that reason.

The model is decoupled (``model_transaction_policy { decoupled: true }``): each request gets one
response per whitespace-separated word of its PROMPT (TOKEN, the word, and INDEX, its position),
then the final-response flag on its own, which Triton sends as an empty final response to
clients that asked for one (``triton_enable_empty_final_response``). A prompt of no words gets
only the flag; one that is not UTF-8 gets an INVALID_ARG error, then the flag.
"""

from typing import Any

import numpy as np

# Triton's stub process provides this module; it cannot be installed, so mypy sees it
# as Any and the rest of this file is still type-checked.
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]


class TritonPythonModel:
    """The Python backend's entry point for a decoupled model: answers through response senders."""

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                for index, word in enumerate(_words(request)):
                    sender.send(
                        pb_utils.InferenceResponse(
                            output_tensors=[
                                pb_utils.Tensor("TOKEN", np.array([word], dtype=np.object_)),
                                pb_utils.Tensor("INDEX", np.array([index], dtype=np.int32)),
                            ]
                        )
                    )
            except UnicodeDecodeError:
                error = pb_utils.TritonError("PROMPT must be UTF-8 text", pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _words(request: Any) -> list[bytes]:
    prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().ravel()[0]
    text = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
    return [word.encode() for word in text.split()]
