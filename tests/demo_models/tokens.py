"""Driving the decoupled demo model `tokens` with Triton's own streaming client, so that tests can
compare its answers from Triton, an orchestrator and a router."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "tokens"
FINAL = "triton_final_response"
Answer = tuple[str, str | None, int | None, bool] | tuple[str, str]
"""(request id, token, index, final flag) of an answer; ("error", message) of an error."""


def prompt_input(prompt: bytes) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("PROMPT", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([prompt], dtype=np.object_))
    return [tensor]


def token_series(address: str, prompt: bytes, *, empty_final: bool, request_id: str = "r1") -> list[Answer]:
    """Every answer to one request on a stream of its own, in the order it came: the stream ends
    once the server has answered the request completely."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with grpcclient.InferenceServerClient(address) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(
            MODEL, prompt_input(prompt), request_id=request_id, enable_empty_final_response=empty_final
        )
        client.stop_stream()
    got: list[Answer] = []
    while not answers.empty():
        result, error = answers.get()
        if error is not None:
            got.append(("error", str(error.message())))
            continue
        response = result.get_response()
        token, index = result.as_numpy("TOKEN"), result.as_numpy("INDEX")
        got.append(
            (
                response.id,
                None if token is None else token[0].decode(),
                None if index is None else int(index[0]),
                response.parameters[FINAL].bool_param,
            )
        )
    return got


def expected_series(request_id: str, words: list[str], *, empty_final: bool) -> list[Answer]:
    """What the model answers for a prompt of `words`: a token each, then the empty final answer
    when it was asked for."""
    series: list[Answer] = [(request_id, word, index, False) for index, word in enumerate(words)]
    if empty_final:
        series.append((request_id, None, None, True))
    return series
