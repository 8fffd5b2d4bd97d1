"""Dividing inputs into shards and decoding rows, on bytes alone."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tensorway.batch.domain import NpyLayout
from tensorway.batch.inputs import (
    InputError,
    _columnar_jsonl,
    coalesce,
    decode_jsonl,
    jsonl_batches,
    npy_batches,
    plan_jsonl,
    plan_npy,
)
from tensorway.batch.shard_messages import parse_task, text_headers
from tensorway.batch.v1.shard_task_pb2 import ShardTask
from tensorway.tensors.signatures import ModelSignature, TensorSpec

SIGNATURE = ModelSignature(
    name="m",
    inputs=(TensorSpec("x", "FP32", (3,)),),
    outputs=(TensorSpec("y", "INT64", (1,)),),
    max_batch_size=4,
)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_jsonl_shards_are_byte_ranges_of_whole_rows(chunk: int) -> None:
    data = b'{"a":1}\n\n{"a":2}\r\n   \n{"a":3}\n{"a":4}\n{"a":5}'
    plan = plan_jsonl((data[i : i + chunk] for i in range(0, len(data), chunk)), shard_size=2)
    assert plan.rows_total == 5
    assert [(s.row_start, s.row_count) for s in plan.shards] == [(0, 2), (2, 2), (4, 1)]
    pieces = [data[s.byte_start : s.byte_end] for s in plan.shards]
    assert b"".join(pieces) == data
    rows = [[json.loads(line)["a"] for line in piece.splitlines() if line.strip()] for piece in pieces]
    assert rows == [[1, 2], [3, 4], [5]]


def test_npy_shards_are_row_slices() -> None:
    array = np.arange(30, dtype=np.float32).reshape(10, 3)
    data = npy_bytes(array)
    plan = plan_npy(data[:4096], len(data), shard_size=4)
    assert plan.rows_total == 10
    assert plan.npy == NpyLayout("<f4", (3,))
    last = plan.shards[-1]
    assert (last.row_start, last.row_count) == (8, 2)
    (batch,) = npy_batches(data[last.byte_start : last.byte_end], last.row_start, plan.npy, SIGNATURE, 4)
    np.testing.assert_array_equal(batch.inputs["x"], array[8:])
    assert batch.ids == [8, 9]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not numpy at all", "not a NumPy .npy array"),
        (npy_bytes(np.asfortranarray(np.ones((3, 2), np.float32))), "Fortran order"),
        (npy_bytes(np.array([{"a": 1}], dtype=object)), "Python objects"),
        (npy_bytes(np.ones((4, 3), np.float32))[:-5], "truncated"),
    ],
)
def test_unusable_npy_inputs_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(InputError, match=reason):
        plan_npy(data, len(data), shard_size=2)


def test_npy_rows_must_fit_the_model() -> None:
    with pytest.raises(InputError, match=r"rows of shape \[4\]"):
        npy_batches(b"", 0, NpyLayout("<f4", (4,)), SIGNATURE, 4)
    with pytest.raises(InputError, match="cannot take"):
        npy_batches(b"", 0, NpyLayout("<c8", (3,)), SIGNATURE, 4)


def test_jsonl_rows_decode_or_fail_alone() -> None:
    lines = [
        {"id": "a", "inputs": {"x": [1, 2, 3]}},
        {"inputs": {"x": [[1.5, 2, 3]]}},
        {"id": 7, "inputs": {"x": [1.5, 2.5]}},
        {"id": "b", "inputs": {"x": [1, 2, 3], "z": [1]}},
        ["not", "an", "object"],
    ]
    data = b"\n".join(json.dumps(line).encode() for line in lines) + b"\n{oops\n"
    good, errors = decode_jsonl(data, 100, SIGNATURE)
    assert [(row, row_id) for row, row_id, _ in good] == [(100, "a"), (101, 101)]
    np.testing.assert_array_equal(good[1][2]["x"], np.array([1.5, 2, 3], np.float32))
    assert [(e.row, e.id) for e in errors] == [(102, 7), (103, "b"), (104, 104), (105, 105)]
    assert "shape [2]" in errors[0].reason
    assert "unknown input 'z'" in errors[1].reason
    assert "expected an object" in errors[2].reason
    assert "not valid JSON" in errors[3].reason


MIXED = ModelSignature(
    name="m",
    inputs=(TensorSpec("x", "INT32", (-1,)), TensorSpec("y", "FP32", (2, 2)), TensorSpec("z", "BOOL", ())),
    outputs=(TensorSpec("y", "INT64", (1,)),),
    max_batch_size=2,
)


def jsonl_lines(*rows: object) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def row_by_row(data: bytes, signature: ModelSignature, batch_size: int) -> tuple[list, list]:
    good, errors = decode_jsonl(data, 100, signature)
    return coalesce(good, batch_size), errors


@pytest.mark.parametrize(
    ("data", "signature", "columnar"),
    [
        # Well-formed shards: read by columns, ints or floats, nested or flat, with or without ids.
        (jsonl_lines(*({"id": i, "inputs": {"x": [i, 2.5, 3]}} for i in range(5))), SIGNATURE, True),
        (b'{"inputs":{"x":[[1,2,3]]},"note":1}\n\n  \n{"inputs":{"x":[[4,5,6]]}}', SIGNATURE, True),
        (
            jsonl_lines(
                *(
                    {"id": str(i), "inputs": {"z": i % 2 == 0, "y": [i, 1, 2, 3], "x": [i, i]}}
                    for i in range(3)
                )
            ),
            MIXED,
            True,
        ),
        # Anything else goes row by row: bad rows, ragged or wrong-kind values, ids that could
        # read back differently, a missing or unknown input.
        (
            jsonl_lines({"id": 1, "inputs": {"x": [1, 2, 3]}}, {"id": 2, "inputs": {"x": [1, 2]}}),
            SIGNATURE,
            False,
        ),
        (jsonl_lines({"id": 1.0, "inputs": {"x": [1, 2, 3]}}), SIGNATURE, False),
        (jsonl_lines({"id": {"a": 1}, "inputs": {"x": [1, 2, 3]}}), SIGNATURE, False),
        (jsonl_lines({"id": 1, "inputs": {"x": ["a", "b", "c"]}}), SIGNATURE, False),
        (jsonl_lines({"id": 1, "inputs": {"x": [1, None, 3]}}), SIGNATURE, False),
        (jsonl_lines({"inputs": {"x": [1, 2, 3]}}, {"id": 2, "inputs": {"x": [1, 2, 3]}}), SIGNATURE, False),
        (jsonl_lines({"inputs": {"x": [1, 2, 3], "w": [1]}}), SIGNATURE, False),
        (jsonl_lines({"inputs": {"x": [1.5, 2], "y": [1, 2, 3, 4], "z": True}}), MIXED, False),
        (b'{"inputs":{"x":[1,2,3]}}\n{oops\n', SIGNATURE, False),
        # Nested deeper than any tensor: Arrow's parser would overflow its stack (SIGSEGV) on this.
        (b'{"inputs":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n", SIGNATURE, False),
    ],
)
def test_jsonl_shards_read_by_columns_give_what_rows_give(
    data: bytes, signature: ModelSignature, columnar: bool
) -> None:
    assert (_columnar_jsonl(data, 100, signature) is not None) == columnar
    batches, errors = jsonl_batches(data, 100, signature, 2)
    expected_batches, expected_errors = row_by_row(data, signature, 2)
    assert errors == expected_errors
    assert [(b.rows, list(b.ids)) for b in batches] == [(b.rows, list(b.ids)) for b in expected_batches]
    for batch, expected in zip(batches, expected_batches, strict=True):
        for name, array in expected.inputs.items():
            assert batch.inputs[name].dtype == array.dtype
            np.testing.assert_array_equal(batch.inputs[name], array)


def test_coalescing_keeps_order_and_never_mixes_shapes() -> None:
    def row(i: int, width: int) -> tuple[int, int, dict[str, np.ndarray]]:
        return (i, i, {"x": np.zeros(width, np.float32)})

    batches = coalesce([row(0, 3), row(1, 3), row(2, 3), row(3, 2), row(4, 3)], batch_size=2)
    assert [b.rows for b in batches] == [[0, 1], [2], [3], [4]]
    assert [b.inputs["x"].shape for b in batches] == [(2, 3), (1, 3), (1, 2), (1, 3)]


def test_shard_messages_parse_or_are_refused() -> None:
    assert parse_task(ShardTask(job="jobs/abc", shard=3).SerializeToString()) == ("abc", 3)
    for value in (b"\xff\xff\xff", ShardTask(job="models/x").SerializeToString(), b""):
        with pytest.raises(ValueError):
            parse_task(value)
    assert text_headers([("traceparent", b"00-ab"), ("bad", b"\xff")]) == {
        "traceparent": "00-ab",
        "bad": "\ufffd",
    }
