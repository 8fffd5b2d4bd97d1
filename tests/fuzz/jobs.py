"""Batch jobs as the fuzz tests run them: inputs uploaded to the mesh's S3, and each job created
and followed to its end, which must come within a bound and say what went wrong."""

from __future__ import annotations

import io
import json
import time
import uuid

import grpc

from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tests.fuzz.conftest import BUCKET, FuzzMesh
from tests.fuzz.outcomes import assert_client_error

# An accepted job with a handful of rows ends well within this, broken input or not.
JOB_BOUND = 60.0
FINAL_STATES = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_PARTIALLY_FAILED, pb.JOB_STATE_FAILED)
TENANT = (("x-tenant-id", "fuzz"),)
# One row iris answers.
GOOD_LINE = json.dumps({"id": 1, "inputs": {"input": [5.1, 3.5, 1.4, 0.2]}}).encode()


def upload(mesh: FuzzMesh, data: bytes, suffix: str) -> str:
    key = f"inputs/{uuid.uuid4().hex}{suffix}"
    mesh.s3.put_object(BUCKET, key, io.BytesIO(data), len(data))
    return f"s3://{BUCKET}/{key}"


def run_to_the_end(mesh: FuzzMesh, job: pb.Job) -> pb.Job | None:
    """Create the job and wait for its end; None when the API refused it (with a client error)."""
    with mesh.channel("batch") as channel:
        stub = pb_grpc.BatchServiceStub(channel)
        try:
            created = stub.CreateJob(
                pb.CreateJobRequest(job=job, request_id=uuid.uuid4().hex), metadata=TENANT, timeout=30
            )
        except grpc.RpcError as error:
            assert_client_error(error)
            return None
        deadline = time.monotonic() + JOB_BOUND
        while True:
            current = stub.GetJob(pb.GetJobRequest(name=created.job.name), metadata=TENANT, timeout=10).job
            if current.state in FINAL_STATES:
                break
            assert time.monotonic() < deadline, f"stuck: {current}"
            time.sleep(0.2)
    assert not mesh.dead_processes(), f"crashed: {mesh.dead_processes()}"
    if current.state == pb.JOB_STATE_FAILED:
        assert current.failure_reason, current
    else:
        progress = current.progress
        assert progress.rows_done + progress.rows_failed == progress.rows_total, current
        assert (progress.rows_failed > 0) == (current.state == pb.JOB_STATE_PARTIALLY_FAILED), current
    return current
