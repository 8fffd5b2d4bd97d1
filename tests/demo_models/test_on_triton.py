"""The demo models served by a real Triton (the session fixture ``triton_grpc``), over gRPC."""

import queue
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tensorway.demo_models._datasets import Split, digits_split, iris_split
from tensorway.demo_models._graphs import train_digits, train_iris
from tests.demo_models.tokens import MODEL, expected_series, prompt_input, token_series

Array = npt.NDArray[Any]


@pytest.fixture(scope="module")
def client(triton_grpc: str) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(triton_grpc) as triton:
        yield triton


def infer(
    client: grpcclient.InferenceServerClient, model: str, inputs: dict[str, Array], outputs: list[str]
) -> dict[str, Array]:
    tensors = []
    for name, array in inputs.items():
        datatype = "BYTES" if array.dtype == np.object_ else grpcclient.np_to_triton_dtype(array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    return {name: result.as_numpy(name) for name in outputs}


def decimal(array: Array) -> Array:
    return np.array([str(v).encode() for v in array.ravel()], dtype=np.object_).reshape(array.shape)


def operands() -> tuple[Array, Array]:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.array([[1] * 16, [-7] * 16], dtype=np.int32)
    return a, b


def test_simple_adds_and_subtracts_a_batch_of_two(client: grpcclient.InferenceServerClient) -> None:
    a, b = operands()
    out = infer(client, "simple", {"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"])
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)
    np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    assert out["OUTPUT0"].dtype == np.int32


def test_simple_string_adds_and_subtracts_decimal_strings(client: grpcclient.InferenceServerClient) -> None:
    a, b = operands()
    out = infer(client, "simple_string", {"INPUT0": decimal(a), "INPUT1": decimal(b)}, ["OUTPUT0", "OUTPUT1"])
    assert out["OUTPUT0"].shape == (2, 16)
    np.testing.assert_array_equal(out["OUTPUT0"].astype(np.int64), a + b)
    np.testing.assert_array_equal(out["OUTPUT1"].astype(np.int64), a - b)


def test_simple_string_rejects_what_is_not_a_decimal(client: grpcclient.InferenceServerClient) -> None:
    a, b = operands()
    words = decimal(a)
    words[1, 3] = b"three"
    with pytest.raises(InferenceServerException) as raised:
        infer(client, "simple_string", {"INPUT0": words, "INPUT1": decimal(b)}, ["OUTPUT0"])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT0" in str(raised.value.message())


@pytest.mark.parametrize(
    ("model", "split", "train"), [("digits", digits_split, train_digits), ("iris", iris_split, train_iris)]
)
def test_classifier_agrees_with_scikit_learn(
    client: grpcclient.InferenceServerClient,
    model: str,
    split: Callable[[], Split],
    train: Callable[[Split], Any],
) -> None:
    data = split()
    estimator = train(data)
    rows = data.x_test[:12]
    out = infer(client, model, {"input": rows}, ["label", "probabilities"])
    assert out["label"].shape == (12, 1)
    np.testing.assert_array_equal(out["label"][:, 0], estimator.predict(rows))
    np.testing.assert_allclose(out["probabilities"], estimator.predict_proba(rows), atol=1e-4)


def test_concurrent_requests_each_get_their_own_rows(client: grpcclient.InferenceServerClient) -> None:
    # The dynamic batcher may hand these to one execute(); each answer must still be its own.
    data = digits_split()
    expected = train_digits(data).predict(data.x_test)
    slices = [
        slice(start, start + size) for start, size in zip(range(0, 400, 40), range(1, 40, 4), strict=False)
    ]

    def labels(rows: slice) -> Array:
        return infer(client, "digits", {"input": data.x_test[rows]}, ["label"])["label"][:, 0]

    with ThreadPoolExecutor(max_workers=len(slices)) as pool:
        for rows, got in zip(slices, pool.map(labels, slices), strict=True):
            np.testing.assert_array_equal(got, expected[rows])


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        ("digits", {"input": np.zeros((2, 63), dtype=np.float32)}),
        ("digits", {"input": np.zeros((1025, 64), dtype=np.float32)}),
        ("iris", {"input": np.zeros((2, 4), dtype=np.float64)}),
        (
            "simple",
            {"INPUT0": np.zeros((1, 15), dtype=np.int32), "INPUT1": np.zeros((1, 15), dtype=np.int32)},
        ),
    ],
    ids=["digits-63-features", "digits-over-max-batch", "iris-fp64", "simple-15-wide"],
)
def test_request_that_does_not_fit_the_signature_is_rejected(
    client: grpcclient.InferenceServerClient, model: str, inputs: dict[str, Array]
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        infer(client, model, inputs, [])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_accumulate_keeps_a_running_sum_per_sequence(client: grpcclient.InferenceServerClient) -> None:
    # Sequences 71 and 72 interleaved on one stream: each sums only its own inputs.
    steps = [(71, 1), (72, 10), (71, 2), (72, 20), (71, 3), (72, 30)]
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for index, (sequence, value) in enumerate(steps):
            tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
            client.async_stream_infer(
                "accumulate",
                [tensor],
                request_id=str(index),
                sequence_id=sequence,
                sequence_start=index < 2,
                sequence_end=index >= len(steps) - 2,
            )
        got = [answers.get(timeout=30) for _ in steps]
    finally:
        client.stop_stream()
    assert [error for _, error in got] == [None] * len(steps)
    sums = {int(result.get_response().id): int(result.as_numpy("OUTPUT")[0, 0]) for result, _ in got}
    assert sums == {0: 1, 1: 10, 2: 3, 3: 30, 4: 6, 5: 60}


def test_accumulate_refuses_a_request_outside_a_sequence(client: grpcclient.InferenceServerClient) -> None:
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("accumulate", [tensor])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("empty_final", [False, True])
def test_tokens_streams_a_prompts_words_one_response_each(triton_grpc: str, empty_final: bool) -> None:
    got = token_series(triton_grpc, b"the quick  brown fox", empty_final=empty_final)
    assert got == expected_series("r1", ["the", "quick", "brown", "fox"], empty_final=empty_final)


def test_tokens_answers_a_prompt_of_no_words_with_the_final_flag_alone(triton_grpc: str) -> None:
    assert token_series(triton_grpc, b"   ", empty_final=True) == expected_series("r1", [], empty_final=True)
    assert token_series(triton_grpc, b"   ", empty_final=False) == []


def test_tokens_refuses_a_prompt_that_is_not_utf8_then_ends(triton_grpc: str) -> None:
    got = token_series(triton_grpc, b"\xff\xfe", empty_final=True)
    assert got == [("error", "PROMPT must be UTF-8 text"), ("r1", None, None, True)]


def test_tokens_is_refused_on_unary_infer(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, prompt_input(b"hello"))
    assert raised.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "decoupled" in str(raised.value.message())
