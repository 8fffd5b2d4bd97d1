"""Batch jobs as the fuzz tests run them: inputs uploaded through the presigned URLs the batch API
hands out, and each job created and followed to its end, which must come within a bound and say
what went wrong."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import grpc

from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.runtime.context import TENANT_SCOPES, identity_metadata
from tests.fuzz.conftest import FuzzMesh
from tests.fuzz.outcomes import assert_client_error

# An accepted job with a handful of rows ends well within this, broken input or not.
JOB_BOUND = 60.0
FINAL_STATES = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_PARTIALLY_FAILED, pb.JOB_STATE_FAILED)
TENANT = tuple(identity_metadata("fuzz", TENANT_SCOPES))
# One row iris answers.
GOOD_LINE = json.dumps({"id": 1, "inputs": {"input": [5.1, 3.5, 1.4, 0.2]}}).encode()


def upload(mesh: FuzzMesh, data: bytes, suffix: str) -> str:
    """Upload `data` as tenant fuzz would: a presigned URL from the batch API, then a plain PUT."""
    with mesh.channel("batch") as channel:
        created = pb_grpc.BatchServiceStub(channel).CreateUpload(
            pb.CreateUploadRequest(file_name=f"rows{suffix}", size_bytes=len(data)),
            metadata=TENANT,
            timeout=10,
        )
    request = urllib.request.Request(created.upload_url, data=data, method="PUT")
    # A loopback URL of the mesh's own S3.
    with urllib.request.urlopen(request, timeout=10) as response:  # nosec B310
        assert response.status == 200
    return created.input_uri


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
