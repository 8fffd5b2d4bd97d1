"""The one place batch protobuf messages and domain values meet."""

from __future__ import annotations

from tensorway.batch.core import JobStatus, Upload
from tensorway.batch.domain import InputFormat, JobDraft, JobState, OutputFormat
from tensorway.batch.results import PresignedObject
from tensorway.batch.v1 import batch_service_pb2 as pb

STATES_TO_PROTO = {state: pb.JobState.Value(f"JOB_STATE_{state.value}") for state in JobState}
FORMATS_TO_PROTO = {fmt: pb.InputFormat.Value(f"INPUT_FORMAT_{fmt.value}") for fmt in InputFormat}
FORMATS_FROM_PROTO = {value: fmt for fmt, value in FORMATS_TO_PROTO.items()}
OUTPUT_FORMATS_TO_PROTO = {fmt: pb.OutputFormat.Value(f"OUTPUT_FORMAT_{fmt.value}") for fmt in OutputFormat}
OUTPUT_FORMATS_FROM_PROTO = {value: fmt for fmt, value in OUTPUT_FORMATS_TO_PROTO.items()}


def draft_from_proto(job: pb.Job) -> JobDraft:
    return JobDraft(
        model=job.model,
        model_version=job.model_version,
        input_uri=job.input_uri,
        input_format=FORMATS_FROM_PROTO.get(job.input_format),
        output_prefix=job.output_prefix,
        shard_size=job.shard_size,
        priority=job.priority,
        output_format=OUTPUT_FORMATS_FROM_PROTO.get(job.output_format),
        input_columns=tuple(sorted(job.input_columns.items())),
        id_column=job.id_column,
    )


def _object(presigned: PresignedObject) -> pb.ResultObject:
    stored = presigned.stored
    return pb.ResultObject(
        uri=stored.uri, presigned_url=presigned.url, rows=stored.rows, sha256=stored.sha256
    )


def job_to_proto(status: JobStatus) -> pb.Job:
    job = status.job
    message = pb.Job(
        name=job.name,
        model=job.spec.model,
        model_version=job.spec.model_version,
        input_uri=job.spec.input_uri,
        input_format=FORMATS_TO_PROTO[job.spec.input_format],
        output_prefix=job.spec.output_prefix,
        shard_size=job.spec.shard_size,
        priority=job.spec.priority,
        output_format=OUTPUT_FORMATS_TO_PROTO[job.spec.output_format],
        input_columns=dict(job.spec.input_columns),
        id_column=job.spec.id_column,
        state=STATES_TO_PROTO[job.state],
        progress=pb.JobProgress(
            rows_total=job.progress.rows_total,
            rows_done=job.progress.rows_done,
            rows_failed=job.progress.rows_failed,
            shards_total=job.progress.shards_total,
            shards_done=job.progress.shards_done,
            rows_per_second=status.rows_per_second,
        ),
        failure_reason=job.failure_reason,
        results=[_object(r) for r in status.results],
    )
    if status.eta is not None:
        message.progress.eta.FromTimedelta(status.eta)
    if status.manifest is not None:
        message.manifest.CopyFrom(_object(status.manifest))
    if status.errors is not None:
        message.errors.CopyFrom(_object(status.errors))
    message.create_time.FromDatetime(job.create_time)
    if job.start_time is not None:
        message.start_time.FromDatetime(job.start_time)
    if job.end_time is not None:
        message.end_time.FromDatetime(job.end_time)
    return message


def upload_to_proto(upload: Upload) -> pb.CreateUploadResponse:
    message = pb.CreateUploadResponse(input_uri=upload.ref.uri, upload_url=upload.url)
    message.expire_time.FromDatetime(upload.expire_time)
    return message
