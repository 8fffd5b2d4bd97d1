"""The batch API's BatchService fed malformed and extreme messages, and batch jobs given broken
JSONL and .npy inputs: every call answers or refuses with a client error, and every job that was
accepted ends (FAILED with a reason, or with each bad row reported) within a bound."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.runtime.context import SCOPES_HEADER, Scope
from tests.batch.test_jobs import npy_of
from tests.fuzz.budget import fuzz_budget
from tests.fuzz.calls import call, call_raw
from tests.fuzz.conftest import BUCKET, FuzzMesh
from tests.fuzz.jobs import GOOD_LINE, TENANT, run_to_the_end, upload
from tests.fuzz.outcomes import assert_mesh_serves
from tests.fuzz.strategies import edgy_text, json_values, messages, request_metadata, wire_garbage

BATCH = pb.DESCRIPTOR.services_by_name["BatchService"]
# The batch API's default prefixes: tenant fuzz's uploads, and another tenant's.
OWN_PREFIX = "s3://tensorway-batch/uploads/fuzz/"
OTHERS_PREFIX = "s3://tensorway-batch/uploads/other/"


@pytest.mark.parametrize("method", list(BATCH.methods), ids=lambda m: m.name)
@fuzz_budget(max_examples=20)
@given(data=st.data())
def test_any_message_to_any_batch_rpc_gets_an_answer_or_a_client_error(
    fuzz_mesh: FuzzMesh, method: object, data: st.DataObject
) -> None:
    call(fuzz_mesh, "batch", method, [data.draw(messages(method.input_type))], TENANT)


@pytest.mark.parametrize("method", list(BATCH.methods), ids=lambda m: m.name)
@fuzz_budget(max_examples=15)
@given(data=st.data())
def test_bytes_that_are_no_request_get_a_client_error(
    fuzz_mesh: FuzzMesh, method: object, data: st.DataObject
) -> None:
    call_raw(fuzz_mesh, "batch", method, [data.draw(wire_garbage(method.input_type))], TENANT)


# --- JSONL -------------------------------------------------------------------------------------


def rows() -> st.SearchStrategy[bytes]:
    """One JSONL line for iris (input FP32 [4]): right, wrong in one part, or not JSON at all."""
    ids = st.one_of(st.integers(-(2**70), 2**70), edgy_text(), json_values())
    inputs = st.one_of(
        st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4, max_size=4),
        st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6),
        st.just([[5.1, 3.5], [1.4, 0.2]]),
        st.just([[1.0, 2.0], [3.0]]),
        json_values(),
    )
    objects = st.builds(
        lambda row_id, name, value: json.dumps(
            {"id": row_id, "inputs": {name: value}}, allow_nan=True
        ).encode(),
        ids,
        st.one_of(st.just("input"), edgy_text()),
        inputs,
    )
    return st.one_of(
        st.just(GOOD_LINE),
        objects,
        json_values().map(lambda value: json.dumps(value, allow_nan=True).encode()),
        st.binary(max_size=30).filter(lambda data: b"\n" not in data),
        st.integers(50, 100_000).map(
            lambda depth: b'{"id": 1, "inputs": {"input": ' + b"[" * depth + b"]" * depth + b"}}"
        ),
        st.sampled_from(
            [
                b'{"id": 1, "inputs": {"input": [1e400, -1e400, NaN, 0]}}',
                b"\xef\xbb\xbf" + GOOD_LINE,
                b'{"id": 1, "inputs": null}',
                b'{"inputs": {"input": [1, 2, 3, 4]}, "id": 1e999}',
                b"[]",
            ]
        ),
    )


@fuzz_budget(max_examples=15)
@given(
    lines=st.lists(rows(), min_size=1, max_size=8),
    newline=st.sampled_from([b"\n", b"\r\n"]),
    shard_size=st.integers(1, 4),
)
# A row nested past the parser's recursion limit failed its whole shard, good rows too, after retries.
@example(
    lines=[GOOD_LINE, b'{"id": 2, "inputs": {"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"],
    newline=b"\n",
    shard_size=2,
)
def test_broken_jsonl_rows_fail_alone_and_the_job_ends(
    fuzz_mesh: FuzzMesh, lines: list[bytes], newline: bytes, shard_size: int
) -> None:
    uri = upload(fuzz_mesh, newline.join(lines) + newline, ".jsonl")
    job = run_to_the_end(fuzz_mesh, pb.Job(model="iris", input_uri=uri, shard_size=shard_size))
    assert job is not None
    assert job.progress.rows_done >= lines.count(GOOD_LINE), job


# --- .npy --------------------------------------------------------------------------------------


def npy_header(header: str, version: int = 1) -> bytes:
    # NumPy reads version 3 headers as UTF-8 and the older ones as latin-1.
    text = header.encode("utf-8" if version == 3 else "latin1", errors="replace")
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(text)) + text


def npy_files() -> st.SearchStrategy[bytes]:
    """A .npy object for iris: right, with the wrong dtype, row shape or order, cut short, padded,
    with a header that lies or cannot be read, or no .npy at all."""
    dtypes = st.sampled_from(["<f4", "<f8", "<i8", "|u1", "|b1", "<c8", "|O", "<U3", "|V4", ">f4", "<f2"])
    row_shapes = st.sampled_from([(4,), (), (2, 2), (5,), (0,), (4, 1)])
    arrays = st.builds(
        lambda dtype, rows_count, row_shape: np.zeros(
            (rows_count, *row_shape), dtype=np.dtype(dtype) if dtype != "|O" else np.float32
        ),
        dtypes.filter(lambda d: d != "|O"),
        st.integers(0, 5),
        row_shapes,
    )
    headers = st.builds(
        lambda descr, shape, order: f"{{'descr': {descr!r}, 'fortran_order': {order}, 'shape': {shape!r}, }}",
        dtypes,
        st.one_of(
            st.tuples(st.integers(-3, 2**63 - 1), st.just(4)), st.just(()), st.tuples(st.integers(0, 3))
        ),
        st.booleans(),
    )
    return st.one_of(
        arrays.map(npy_of),
        arrays.map(npy_of).flatmap(lambda data: st.integers(0, len(data)).map(lambda cut: data[:cut])),
        arrays.map(npy_of).map(lambda data: data + b"\0" * 7),
        st.builds(
            lambda header, body, version: npy_header(header, version) + body,
            headers,
            st.binary(max_size=64),
            st.sampled_from([1, 2, 3, 4]),
        ),
        st.builds(npy_header, edgy_text(), st.sampled_from([2, 3])),
        st.binary(max_size=64),
    )


@fuzz_budget(max_examples=15)
@given(data=npy_files(), shard_size=st.integers(1, 3))
@example(data=npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2**62, 4), }"), shard_size=1)
def test_broken_npy_inputs_fail_the_job_with_a_reason(
    fuzz_mesh: FuzzMesh, data: bytes, shard_size: int
) -> None:
    uri = upload(fuzz_mesh, data, ".npy")
    run_to_the_end(fuzz_mesh, pb.Job(model="iris", input_uri=uri, shard_size=shard_size))


# --- odd jobs ----------------------------------------------------------------------------------


@fuzz_budget(max_examples=20)
@given(data=st.data())
def test_odd_jobs_are_refused_or_end(fuzz_mesh: FuzzMesh, data: st.DataObject) -> None:
    uri = upload(fuzz_mesh, GOOD_LINE + b"\n", ".jsonl")
    uris = st.one_of(
        st.just(uri),
        st.sampled_from(
            [
                f"s3://{BUCKET}/missing.jsonl",
                f"{OWN_PREFIX}missing.jsonl",
                f"{OWN_PREFIX}../other/x.jsonl",
                f"{OWN_PREFIX}%2e%2e/x.jsonl",
                f"{OWN_PREFIX}/x.jsonl",
                f"{OTHERS_PREFIX}x.jsonl",
                "s3://no-such-bucket/x.jsonl",
                "s3://",
                "s3:///x.npy",
                "file:///etc/passwd",
                "http://127.0.0.1:9/x.jsonl",
                f"s3://{BUCKET}/inputs/",
                uri + "/",
            ]
        ),
        edgy_text(),
    )
    job = pb.Job(
        model=data.draw(
            st.one_of(st.sampled_from(["iris", "digits", "simple", "nope", "simple_string"]), edgy_text())
        ),
        model_version=data.draw(st.one_of(st.sampled_from(["", "1", "2", "production"]), edgy_text())),
        input_uri=data.draw(uris),
        input_format=data.draw(st.integers(0, 4)),
        output_prefix=data.draw(
            st.one_of(
                st.just(""),
                st.just(f"s3://{BUCKET}/out/"),
                st.just("s3://no-such-bucket/out/"),
                st.just("s3://tensorway-batch/results/fuzz/"),
                st.just("s3://tensorway-batch/results/fuzz/../other/"),
                edgy_text(),
            )
        ),
        shard_size=data.draw(st.one_of(st.integers(-1, 3), st.sampled_from([-(2**31), 2**31 - 1]))),
        priority=data.draw(st.sampled_from([0, 9, -1, 10, -(2**31), 2**31 - 1])),
    )
    run_to_the_end(fuzz_mesh, job)


@fuzz_budget(max_examples=20)
@given(
    metadata=request_metadata(), method=st.sampled_from(["ListJobs", "GetJob", "CancelJob"]), data=st.data()
)
def test_odd_request_headers_are_tolerated(
    fuzz_mesh: FuzzMesh, metadata: list[tuple[str, str]], method: str, data: st.DataObject
) -> None:
    rpc = BATCH.methods_by_name[method]
    # With the batch scope, so that the odd tenants and ids reach the store, not only the scope check.
    allowed = [*metadata, (SCOPES_HEADER, Scope.BATCH.value)]
    call(fuzz_mesh, "batch", rpc, [data.draw(messages(rpc.input_type))], allowed)


def test_the_batch_pipeline_still_serves_after_the_fuzzing(fuzz_mesh: FuzzMesh) -> None:
    assert_mesh_serves(fuzz_mesh)
    uri = upload(fuzz_mesh, GOOD_LINE + b"\n", ".jsonl")
    job = run_to_the_end(fuzz_mesh, pb.Job(model="iris", input_uri=uri))
    assert job is not None
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
