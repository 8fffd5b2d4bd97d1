"""The batch API against a hostile tenant, on the real pipeline: globex tries to read acme's
uploads, write into acme's results, name other buckets, climb out of its prefix, forge page
tokens and starve acme. Each refusal names the field, and nothing changes: no job row, no
object, no bucket."""

from __future__ import annotations

import asyncio
import base64
import io
import urllib.request
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from minio import Minio

from tensorway.batch.domain import InputFormat, JobSpec
from tensorway.batch.job_store import JobStore
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.runtime.context import Scope

from .conftest import (
    BUCKET,
    SHARDS_IN_FLIGHT,
    SHARED_BUCKET,
    TritonForwarder,
    digits_rows,
    poll_job,
    tenant,
    upload,
    wait_for_state,
)
from .test_jobs import create, npy_of, read_results

pytestmark = pytest.mark.timeout(120)
OTHER_BUCKET = "batch-tests-other"


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations of an error: field → description."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.update({v.field: v.description for v in bad_request.field_violations})
    return found


class World:
    """What a refused request must leave as it was: job rows, shards, outbox, buckets, objects."""

    def __init__(self, postgres_url: str, s3: Minio) -> None:
        self._postgres_url = postgres_url
        self._s3 = s3

    def _rows(self) -> tuple[int, ...]:
        with psycopg.connect(self._postgres_url) as connection:
            return tuple(
                connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
                for table in ("batch_jobs", "batch_shards", "batch_outbox")
            )

    def _objects(self) -> set[tuple[str, str, str]]:
        return {
            (bucket.name, str(o.object_name), str(o.etag))
            for bucket in self._s3.list_buckets()
            for o in self._s3.list_objects(bucket.name, recursive=True)
        }

    def snapshot(self) -> tuple[tuple[int, ...], set[tuple[str, str, str]]]:
        return self._rows(), self._objects()


@pytest.fixture
def world(postgres_url: str, s3: Minio) -> World:
    if not s3.bucket_exists(OTHER_BUCKET):
        s3.make_bucket(OTHER_BUCKET)
    return World(postgres_url, s3)


async def refused(
    world: World, call: object, code: grpc.StatusCode, field: str | None
) -> grpc.aio.AioRpcError:
    """Await `call`, which must fail with `code` naming `field`, and change nothing."""
    before = world.snapshot()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    error = caught.value
    assert error.code() == code, error.details()
    if field is not None:
        assert field in violations(error), (field, violations(error), error.details())
    assert world.snapshot() == before, "a refused request changed jobs or objects"
    return error


def put(url: str, data: bytes) -> int:
    """PUT `data` to a presigned URL, with no credentials; the HTTP status."""
    request = urllib.request.Request(url, data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def job_request(input_uri: str, **fields: object) -> pb.CreateJobRequest:
    return pb.CreateJobRequest(
        job=pb.Job(model="digits", input_uri=input_uri, **fields), request_id=uuid.uuid4().hex
    )


# --- scopes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "identity",
    [(), tenant("globex", (Scope.INFER, Scope.MODELS_READ)), (("x-tenant-id", "globex"),)],
    ids=["no identity", "a token without the batch scope", "a tenant without scopes"],
)
async def test_every_call_needs_the_batch_scope(
    batch: pb_grpc.BatchServiceStub, s3: Minio, world: World, identity: tuple[tuple[str, str], ...]
) -> None:
    job = await create(batch, "globex", upload(s3, npy_of(digits_rows(5)), ".npy", "globex"), 5)
    name = job.name
    # Ended first, so that its work does not change what the refusals must leave alone.
    assert (await wait_for_state(batch, name, "globex")).state == pb.JOB_STATE_SUCCEEDED
    calls = [
        batch.CreateJob(job_request(upload(s3, b"{}\n", ".jsonl", "globex")), metadata=identity),
        batch.GetJob(pb.GetJobRequest(name=name), metadata=identity),
        batch.ListJobs(pb.ListJobsRequest(), metadata=identity),
        batch.CancelJob(pb.CancelJobRequest(name=name), metadata=identity),
        batch.CreateUpload(pb.CreateUploadRequest(file_name="x.jsonl", size_bytes=10), metadata=identity),
    ]
    for call in calls:
        await refused(world, call, grpc.StatusCode.PERMISSION_DENIED, None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in batch.WatchJob(pb.WatchJobRequest(name=name), metadata=identity):
            pass
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    after = (await batch.GetJob(pb.GetJobRequest(name=name), metadata=tenant("globex"))).job
    assert after.state == pb.JOB_STATE_SUCCEEDED


# --- uploads -----------------------------------------------------------------------------------


async def test_an_upload_goes_through_its_presigned_url_under_the_tenants_prefix(
    batch: pb_grpc.BatchServiceStub, forwarder: tuple[str, TritonForwarder]
) -> None:
    data = npy_of(digits_rows(30, seed=21))
    created = await batch.CreateUpload(
        pb.CreateUploadRequest(file_name="../../acme/My Rows (final).npy", size_bytes=len(data)),
        metadata=tenant("globex"),
    )
    assert created.input_uri.startswith(f"s3://{BUCKET}/uploads/globex/")
    assert created.input_uri.endswith("/My_Rows_final_.npy")
    assert ".." not in created.input_uri
    expires = created.expire_time.ToDatetime(tzinfo=UTC)
    assert datetime.now(UTC) < expires <= datetime.now(UTC) + timedelta(hours=1, seconds=5)
    assert await asyncio.to_thread(put, created.upload_url, data) == 200

    job = await create(batch, "globex", created.input_uri, 10)
    done = await wait_for_state(batch, job.name, "globex")
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert done.output_prefix == f"s3://{BUCKET}/results/globex/{job.name.removeprefix('jobs/')}/"
    assert len(read_results(done)) == 30
    # The workers asked the router as the job's tenant, with the infer scope only.
    assert forwarder[1].callers[job.name.removeprefix("jobs/")] == {("globex", frozenset({"infer"}))}


@pytest.mark.parametrize(
    ("size", "name", "field"),
    [(-1, "rows.jsonl", "size_bytes"), (5 * 1024**3 + 1, "rows.jsonl", "size_bytes"), (10, "", "file_name")],
)
async def test_an_upload_too_large_or_unnamed_is_refused(
    batch: pb_grpc.BatchServiceStub, world: World, size: int, name: str, field: str
) -> None:
    request = pb.CreateUploadRequest(file_name=name, size_bytes=size)
    await refused(
        world,
        batch.CreateUpload(request, metadata=tenant("globex")),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )


@pytest.mark.parametrize("name", ["../acme", "acme/../globex", "a/b", ".", "-acme", "acme\\x"])
async def test_a_tenant_id_that_could_reach_another_prefix_owns_no_objects(
    batch: pb_grpc.BatchServiceStub, world: World, name: str
) -> None:
    request = pb.CreateUploadRequest(file_name="rows.jsonl", size_bytes=10)
    await refused(
        world, batch.CreateUpload(request, metadata=tenant(name)), grpc.StatusCode.PERMISSION_DENIED, None
    )


# --- objects of others -------------------------------------------------------------------------


MALFORMED_INPUTS = [
    f"s3://{BUCKET}/uploads/globex/../acme/rows.npy",
    f"s3://{BUCKET}/uploads/globex/./rows.npy",
    f"s3://{BUCKET}/uploads/globex//rows.npy",
    f"s3://{BUCKET}//uploads/globex/rows.npy",
    f"s3://{BUCKET}/uploads/globex/%2e%2e/acme/rows.npy",
    f"s3://{BUCKET}/uploads/globex/%2E%2E%2Facme%2Frows.npy",
    f"s3://{BUCKET}/uploads/globex/..%2facme/rows.npy",
    f"s3://{BUCKET}/uploads/globex/..\\acme\\rows.npy",
    f"s3://{BUCKET}/uploads/globex/rows.npy\n",
    f"s3://{BUCKET}",
    "s3://New-Bucket/uploads/globex/rows.npy",
    "s3://a/uploads/globex/rows.npy",
    "s3://127.0.0.1/uploads/globex/rows.npy",
    "s3:///uploads/globex/rows.npy",
    "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data",
    "",
]


@pytest.mark.parametrize("uri", MALFORMED_INPUTS)
async def test_a_malformed_input_uri_is_invalid_argument(
    batch: pb_grpc.BatchServiceStub, world: World, uri: str
) -> None:
    await refused(
        world,
        batch.CreateJob(job_request(uri), metadata=tenant("globex")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "job.input_uri",
    )


@pytest.mark.parametrize("input_format", [pb.INPUT_FORMAT_JSONL, pb.INPUT_FORMAT_NPY])
async def test_a_prefix_input_is_parquet_only(
    batch: pb_grpc.BatchServiceStub, world: World, input_format: pb.InputFormat
) -> None:
    # The tenant's own uploads prefix is a Parquet dataset's place; no other layout spans objects.
    await refused(
        world,
        batch.CreateJob(
            job_request(f"s3://{BUCKET}/uploads/globex/", input_format=input_format),
            metadata=tenant("globex"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "job.input_uri",
    )


async def test_another_tenants_objects_cannot_be_read(
    batch: pb_grpc.BatchServiceStub, s3: Minio, world: World
) -> None:
    acmes = upload(s3, npy_of(digits_rows(10)), ".npy", "acme")
    data = npy_of(digits_rows(10))
    s3.put_object(SHARED_BUCKET, "acme-data/rows.npy", io.BytesIO(data), len(data))
    s3.put_object(OTHER_BUCKET, "uploads/globex/rows.npy", io.BytesIO(data), len(data))
    for uri in (
        acmes,
        f"s3://{SHARED_BUCKET}/acme-data/rows.npy",  # acme's by the settings, not globex's
        f"s3://{OTHER_BUCKET}/uploads/globex/rows.npy",  # globex's path, in a bucket not the service's
        f"s3://{BUCKET}/results/globex/rows.npy",  # globex's, but results are not inputs
        f"s3://{BUCKET}/uploads/globex-not/rows.npy",  # a tenant whose id starts like globex's
        "s3://no-such-bucket-at-all/uploads/globex/rows.npy",  # would need a bucket made
        f"s3://{BUCKET}/uploads/acme/",  # acme's whole prefix, as a Parquet dataset
        f"s3://{BUCKET}/uploads/",  # every tenant's uploads
    ):
        error = await refused(
            world,
            batch.CreateJob(job_request(uri), metadata=tenant("globex")),
            grpc.StatusCode.PERMISSION_DENIED,
            "job.input_uri",
        )
        assert "acme" not in (error.details() or "")
    # What globex may not read, acme may: its upload, and the prefix the settings give it.
    for uri in (acmes, f"s3://{SHARED_BUCKET}/acme-data/rows.npy"):
        job = await create(batch, "acme", uri, 10)
        assert (await wait_for_state(batch, job.name, "acme")).state == pb.JOB_STATE_SUCCEEDED


async def test_results_go_only_under_the_jobs_own_prefix(
    batch: pb_grpc.BatchServiceStub, s3: Minio, world: World
) -> None:
    acme_job = await create(batch, "acme", upload(s3, npy_of(digits_rows(10)), ".npy", "acme"), 10)
    acme_done = await wait_for_state(batch, acme_job.name, "acme")
    own_input = upload(s3, npy_of(digits_rows(10)), ".npy", "globex")
    for prefix, code in (
        (acme_done.output_prefix, grpc.StatusCode.PERMISSION_DENIED),  # overwrite acme's parts
        (acme_done.output_prefix + "parts/", grpc.StatusCode.PERMISSION_DENIED),
        (f"s3://{BUCKET}/results/globex/", grpc.StatusCode.PERMISSION_DENIED),  # not this job's
        (f"s3://{BUCKET}/uploads/globex/out/", grpc.StatusCode.PERMISSION_DENIED),
        (f"s3://{OTHER_BUCKET}/results/globex/", grpc.StatusCode.PERMISSION_DENIED),
        ("s3://brand-new-bucket/out/", grpc.StatusCode.PERMISSION_DENIED),
        (f"s3://{BUCKET}/results/globex/../acme/{acme_job.name[5:]}/", grpc.StatusCode.INVALID_ARGUMENT),
        (f"s3://{BUCKET}/results/globex/x/..", grpc.StatusCode.INVALID_ARGUMENT),
        (f"s3://{BUCKET}/results//", grpc.StatusCode.INVALID_ARGUMENT),
        (f"s3://{BUCKET}/results/%2e%2e/", grpc.StatusCode.INVALID_ARGUMENT),
        (f"s3://{BUCKET}/results/globex", grpc.StatusCode.INVALID_ARGUMENT),
        ("s3://BUCKET/out/", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        request = job_request(own_input, output_prefix=prefix)
        await refused(world, batch.CreateJob(request, metadata=tenant("globex")), code, "job.output_prefix")
    again = (await batch.GetJob(pb.GetJobRequest(name=acme_job.name), metadata=tenant("acme"))).job
    assert [r.sha256 for r in again.results] == [r.sha256 for r in acme_done.results]
    assert again.manifest.sha256 == acme_done.manifest.sha256


@pytest.mark.parametrize("priority", [-1, 10, 2**31 - 1, -(2**31)])
async def test_a_priority_out_of_bounds_is_invalid_argument(
    batch: pb_grpc.BatchServiceStub, s3: Minio, world: World, priority: int
) -> None:
    request = job_request(upload(s3, npy_of(digits_rows(5)), ".npy", "globex"), priority=priority)
    await refused(
        world,
        batch.CreateJob(request, metadata=tenant("globex")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "job.priority",
    )


# --- page tokens -------------------------------------------------------------------------------


async def test_forged_and_foreign_page_tokens_are_invalid_argument(
    batch: pb_grpc.BatchServiceStub, s3: Minio, world: World
) -> None:
    for _ in range(3):
        job = await create(batch, "acme", upload(s3, npy_of(digits_rows(5)), ".npy", "acme"), 5)
        await wait_for_state(batch, job.name, "acme")
    page = await batch.ListJobs(pb.ListJobsRequest(page_size=1), metadata=tenant("acme"))
    token = page.next_page_token
    assert token
    second = pb.ListJobsRequest(page_size=1, page_token=token)
    following = await batch.ListJobs(second, metadata=tenant("acme"))
    assert following.jobs[0].name != page.jobs[0].name

    def b64(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode()

    listing = base64.urlsafe_b64decode(token).decode().partition(".")[2]
    forged = [
        "not a token",
        "%%%",
        b64("1"),
        b64("99999999999999999999999999"),
        b64(f"99999999999999999999999999.{listing}"),
        b64(f"-5.{listing}"),
        b64(f"0.{listing}"),
        b64(f" 5.{listing}"),
        b64(f"1_0.{listing}"),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "A" * 5000,
    ]
    for bad in forged:
        await refused(
            world,
            batch.ListJobs(pb.ListJobsRequest(page_token=bad), metadata=tenant("acme")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token",
        )
    # acme's token is not globex's, nor for another filter of acme's.
    await refused(
        world,
        batch.ListJobs(pb.ListJobsRequest(page_token=token), metadata=tenant("globex")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )
    await refused(
        world,
        batch.ListJobs(pb.ListJobsRequest(page_token=token, filter="model=digits"), metadata=tenant("acme")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )


# --- poison jobs and fairness ------------------------------------------------------------------


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[JobStore]:
    """The pipeline's own database, to record jobs as an older server (without the checks) did."""
    opened = await JobStore.open(
        postgres_url, max_size=2, wait=timedelta(seconds=5), retry_after=timedelta(seconds=1)
    )
    yield opened
    await opened.close()


async def test_a_job_the_planner_cannot_plan_fails_and_the_others_run(
    batch: pb_grpc.BatchServiceStub, s3: Minio, store: JobStore
) -> None:
    good = upload(s3, npy_of(digits_rows(10)), ".npy", "acme")
    poison: dict[str, tuple[str, str]] = {}
    for input_uri, output in (
        (f"s3://{BUCKET}/uploads/acme/../globex/rows.npy", ""),  # the planner raised on this forever
        (good, f"s3://{BUCKET}/results/acme/../../x/"),  # this job stayed RUNNING forever
        (f"s3://{OTHER_BUCKET}/rows.npy", ""),
        (upload(s3, b"\x93NUMPY\x01\x00\xff\xff{'descr'", ".npy", "acme"), ""),
    ):
        job_id = uuid.uuid4().hex
        spec = JobSpec(
            model="digits",
            model_version="",
            input_uri=input_uri,
            input_format=InputFormat.NPY,
            output_prefix=output or f"s3://{BUCKET}/results/acme/{job_id}/",
            shard_size=5,
            priority=9,
        )
        await store.create_job(job_id, "acme", "", spec, {})
        poison[f"jobs/{job_id}"] = (input_uri, output)
    after = await create(batch, "globex", upload(s3, npy_of(digits_rows(10)), ".npy", "globex"), 5)

    assert (await wait_for_state(batch, after.name, "globex")).state == pb.JOB_STATE_SUCCEEDED
    for name in poison:
        failed = await wait_for_state(batch, name, "acme")
        assert failed.state == pb.JOB_STATE_FAILED, failed
        assert failed.failure_reason, failed
        assert failed.progress.shards_total == 0, failed
    assert not list(s3.list_objects(BUCKET, prefix="x/", recursive=True))


async def test_one_tenants_backlog_does_not_hold_up_anothers_shard(
    batch: pb_grpc.BatchServiceStub, s3: Minio
) -> None:
    backlog = 40 * SHARDS_IN_FLIGHT
    big = await create(
        batch, "acme", upload(s3, npy_of(digits_rows(backlog * 10, seed=22)), ".npy", "acme"), 10, priority=9
    )
    try:
        await poll_job(batch, big.name, "acme", lambda j: j.progress.shards_done >= 1)
        small = await create(batch, "globex", upload(s3, npy_of(digits_rows(10)), ".npy", "globex"), 10)
        done = await wait_for_state(batch, small.name, "globex")
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
        meanwhile = (await batch.GetJob(pb.GetJobRequest(name=big.name), metadata=tenant("acme"))).job
        # First come, first served, globex's shard would wait behind all of acme's.
        assert meanwhile.state == pb.JOB_STATE_RUNNING
        assert meanwhile.progress.shards_done < backlog // 2, meanwhile.progress
    finally:
        await batch.CancelJob(pb.CancelJobRequest(name=big.name), metadata=tenant("acme"))
