"""Answer lines, on arrays alone: each row's JSON text and the lines a part holds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tensorway.batch.results import answer_lines
from tensorway.batch.tensors import json_rows

SHAPES = [(5,), (5, 1), (5, 3), (5, 2, 3), (3, 2, 2, 2), (5, 2, 0), (1, 0), (1,), (0, 3)]
DTYPES = [np.float32, np.float16, np.float64, np.int64, np.uint8, np.bool_]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_reads_back_as_the_same_values(shape: tuple[int, ...], dtype: type) -> None:
    array = (np.random.default_rng(0).random(shape) * 10).astype(dtype)
    rows = json_rows(array)
    assert len(rows) == shape[0]
    for text, row in zip(rows, array, strict=True):
        np.testing.assert_array_equal(np.array(json.loads(text), dtype=dtype).reshape(row.shape), row)


def test_float32_rows_use_the_shortest_digits_that_narrow_back() -> None:
    assert json_rows(np.array([[0.1, 1 / 3]], dtype=np.float32)) == [b"[0.1,0.33333334]"]


def test_bytes_rows_are_text_whatever_they_hold() -> None:
    array = np.array([[b"a],[b", b'x"y'], [b"\xff", b""]], dtype=np.object_)
    assert [json.loads(text) for text in json_rows(array)] == [["a],[b", 'x"y'], ["\\xff", ""]]


def test_answer_lines_hold_each_id_and_output() -> None:
    ids = [7, "a%s", 2**70]
    outputs = {
        "la%bel": json_rows(np.array([[1], [2], [3]])),
        "p": json_rows(np.array([[0.5, 1.25]] * 3, dtype=np.float32)),
    }
    lines = answer_lines(ids, outputs)
    assert all(line.endswith(b"\n") for line in lines)
    assert [json.loads(line) for line in lines] == [
        {"id": 7, "outputs": {"la%bel": [1], "p": [0.5, 1.25]}},
        {"id": "a%s", "outputs": {"la%bel": [2], "p": [0.5, 1.25]}},
        {"id": 2**70, "outputs": {"la%bel": [3], "p": [0.5, 1.25]}},
    ]


def test_answer_lines_refuse_outputs_of_another_row_count() -> None:
    with pytest.raises(ValueError):
        answer_lines([1, 2], {"y": [b"1"]})
