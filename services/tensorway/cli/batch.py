"""`tensorway batch`: submit a job (uploading a local file first, through a presigned URL the API
hands out), follow it with a live progress bar, and read its status, list, cancel it or download
its results, against the batch API at `--api` or TENSORWAY_BATCH_ADDRESS."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar
from urllib.parse import urlsplit

import grpc
import typer
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.cli.addresses import service_address
from tensorway.runtime.context import DEFAULT_TENANT, Scope, identity_metadata

T = TypeVar("T")

batch_app = typer.Typer(
    name="batch",
    help="Run batch inference jobs over files in object storage.",
    no_args_is_help=True,
)
_out = Console()
_err = Console(stderr=True)
CALL_TIMEOUT_SECONDS = 30.0
# Per socket operation, not for the whole upload: a large file takes as long as it takes.
UPLOAD_TIMEOUT_SECONDS = 60.0
ACTIVE = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
FORMATS = {"jsonl": pb.INPUT_FORMAT_JSONL, "npy": pb.INPUT_FORMAT_NPY}


@dataclass
class _Target:
    api: str = ""
    tenant: str = ""


_target = _Target()


@batch_app.callback()
def batch(
    *,
    api: Annotated[
        str,
        typer.Option(
            "--api",
            envvar="TENSORWAY_BATCH_ADDRESS",
            help="The batch API's gRPC address; default: the local stack's.",
        ),
    ] = "",
    tenant: Annotated[
        str,
        typer.Option(
            envvar="TENSORWAY_TENANT",
            help="Act as this tenant (x-tenant-id, with the batch scope), as Envoy would for its token.",
        ),
    ] = "",
) -> None:
    """Run batch inference jobs over files in object storage."""
    _target.api, _target.tenant = api, tenant


def _metadata() -> tuple[tuple[str, str], ...]:
    # The identity Envoy sets from a token; a call through Envoy has it replaced by the token's.
    return tuple(identity_metadata(_target.tenant or DEFAULT_TENANT, (Scope.BATCH,)))


@contextmanager
def _stub() -> Iterator[pb_grpc.BatchServiceStub]:
    address = service_address(_target.api, "batch", "--api", "TENSORWAY_BATCH_ADDRESS")
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.BatchServiceStub(channel)


def _call(method: Callable[..., T], request: object) -> T:
    """One call; a failure is printed with its field violations, then exits 1."""
    try:
        return method(request, timeout=CALL_TIMEOUT_SECONDS, metadata=_metadata())
    except grpc.RpcError as error:
        raise _fail(error) from None


def _fail(error: grpc.RpcError) -> typer.Exit:
    code: grpc.StatusCode = error.code()
    _err.print(f"[bold red]{code.name}[/bold red]: {escape(error.details() or '')}", highlight=False)
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                _err.print(f"  [yellow]{escape(violation.field)}[/yellow]: {escape(violation.description)}")
    return typer.Exit(1)


def _name(job: str) -> str:
    return job if job.startswith("jobs/") else f"jobs/{job}"


def _state(job: pb.Job) -> str:
    return pb.JobState.Name(job.state).removeprefix("JOB_STATE_")


def _upload(stub: pb_grpc.BatchServiceStub, path: Path) -> str:
    """Upload a local file through a presigned URL the API hands out (no storage keys needed
    here); returns the s3:// URI a job takes as its input."""
    size = path.stat().st_size
    upload = _call(stub.CreateUpload, pb.CreateUploadRequest(file_name=path.name, size_bytes=size))
    if urlsplit(upload.upload_url).scheme not in ("http", "https"):
        _err.print(f"[red]the API gave an upload URL that is not http(s): {escape(upload.upload_url)}[/red]")
        raise typer.Exit(1)
    with path.open("rb") as body:
        request = urllib.request.Request(  # noqa: S310  # nosec B310: http(s), checked above
            upload.upload_url, data=body, method="PUT", headers={"Content-Length": str(size)}
        )
        try:
            with urllib.request.urlopen(request, timeout=UPLOAD_TIMEOUT_SECONDS):  # noqa: S310  # nosec B310
                pass
        except urllib.error.HTTPError as error:
            _err.print(f"[red]upload of {escape(path.name)} refused: HTTP {error.code}[/red]")
            raise typer.Exit(1) from None
    return upload.input_uri


def _print_job(job: pb.Job) -> None:
    table = Table(show_header=False, box=None)
    progress = job.progress
    rows = [
        ("job", job.name),
        ("state", _state(job)),
        ("model", job.model + (f" (version {job.model_version})" if job.model_version else "")),
        ("input", job.input_uri),
        ("output", job.output_prefix),
        ("rows", f"{progress.rows_done} done, {progress.rows_failed} failed of {progress.rows_total}"),
        ("shards", f"{progress.shards_done} of {progress.shards_total}"),
    ]
    if job.failure_reason:
        rows.append(("reason", job.failure_reason))
    if job.HasField("manifest"):
        rows.append(("manifest", job.manifest.presigned_url))
    rows.extend((f"part {i}", r.presigned_url) for i, r in enumerate(job.results))
    if job.HasField("errors"):
        rows.append(("errors", job.errors.presigned_url))
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", escape(value))
    _out.print(table)


def _watch(stub: pb_grpc.BatchServiceStub, name: str) -> pb.Job:
    """Follow the job on a progress bar until it ends; returns its final state."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows  {task.fields[rate]:,.0f}/s"),
        TimeRemainingColumn(),
    )
    job = pb.Job()
    with Progress(*columns, console=_err, transient=False) as bar:
        task = bar.add_task("QUEUED", total=None, rate=0.0)
        try:
            for response in stub.WatchJob(pb.WatchJobRequest(name=name), metadata=_metadata()):
                job = response.job
                progress = job.progress
                bar.update(
                    task,
                    description=_state(job),
                    total=progress.rows_total or None,
                    completed=progress.rows_done + progress.rows_failed,
                    rate=progress.rows_per_second,
                )
        except grpc.RpcError as error:
            raise _fail(error) from None
    return job


@batch_app.command()
def submit(
    source: Annotated[
        str, typer.Argument(help="A local .jsonl/.npy file (uploaded first) or s3://bucket/key.")
    ],
    *,
    model: Annotated[str, typer.Option(help="The model to run.")],
    version: Annotated[str, typer.Option(help="The model version; empty lets the router choose.")] = "",
    input_format: Annotated[
        str, typer.Option("--format", help="jsonl or npy; taken from the extension when empty.")
    ] = "",
    shard_size: Annotated[int, typer.Option(help="Rows per shard; 0 takes the server's default.")] = 0,
    priority: Annotated[
        int, typer.Option(help="Among your own jobs, higher runs first (0-9 by default).")
    ] = 0,
    wait: Annotated[bool, typer.Option("--wait", help="Follow progress until the job ends.")] = False,
) -> None:
    """Create a job; with --wait, show its progress and print the result URLs."""
    if input_format and input_format not in FORMATS:
        raise typer.BadParameter("jsonl or npy", param_hint="--format")
    path = Path(source)
    if not source.startswith("s3://") and not path.is_file():
        raise typer.BadParameter(f"{source!r} is neither a file nor an s3:// URI", param_hint="SOURCE")
    with _stub() as stub:
        if source.startswith("s3://"):
            input_uri = source
        else:
            input_uri = _upload(stub, path)
            _err.print(f"uploaded {escape(source)} to {escape(input_uri)}")
        job = pb.Job(
            model=model,
            model_version=version,
            input_uri=input_uri,
            input_format=FORMATS.get(input_format, pb.INPUT_FORMAT_UNSPECIFIED),
            shard_size=shard_size,
            priority=priority,
        )
        created = _call(stub.CreateJob, pb.CreateJobRequest(job=job, request_id=uuid.uuid4().hex)).job
        _out.print(created.name)
        if not wait:
            return
        final = _watch(stub, created.name)
    _print_job(final)
    if final.state != pb.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@batch_app.command()
def status(job: Annotated[str, typer.Argument(help="jobs/ID or ID.")]) -> None:
    """Show a job: state, progress and, when it has ended, its result URLs."""
    with _stub() as stub:
        _print_job(_call(stub.GetJob, pb.GetJobRequest(name=_name(job))).job)


@batch_app.command("list")
def list_jobs(
    filter_text: Annotated[str, typer.Option("--filter", help='e.g. "state=RUNNING AND model=digits".')] = "",
    page_size: Annotated[int, typer.Option(help="Jobs a page.")] = 50,
    after: Annotated[str, typer.Option("--page-token", help="Where a previous page ended.")] = "",
) -> None:
    """The tenant's jobs, newest first."""
    with _stub() as stub:
        request = pb.ListJobsRequest(filter=filter_text, page_size=page_size, page_token=after)
        page = _call(stub.ListJobs, request)
    # Job names are what the other commands take: never folded, so they can be copied whole.
    job_column = Column("job", no_wrap=True)
    table = Table(job_column, "state", "model", "rows done", "rows failed", "rows total", "created")
    for j in page.jobs:
        p = j.progress
        created = j.create_time.ToDatetime().isoformat(timespec="seconds")
        cells = (j.name, _state(j), j.model, str(p.rows_done), str(p.rows_failed), str(p.rows_total), created)
        table.add_row(*(escape(c) for c in cells))
    _out.print(table)
    if page.next_page_token:
        _err.print(f"more: --page-token {page.next_page_token}")


@batch_app.command()
def cancel(job: Annotated[str, typer.Argument(help="jobs/ID or ID.")]) -> None:
    """Cancel a job: shards not yet finished are dropped."""
    with _stub() as stub:
        _print_job(_call(stub.CancelJob, pb.CancelJobRequest(name=_name(job))).job)


def _fetch(url: str, target: Path, sha256: str) -> None:
    # Presigned URLs are http(s) by construction; the sum proves the bytes are the job's.
    with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_SECONDS) as response:  # noqa: S310  # nosec B310
        data = response.read()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        _err.print(f"[red]{escape(target.name)}: checksum mismatch[/red]")
        raise typer.Exit(1)
    target.write_bytes(data)


@batch_app.command()
def download(
    job: Annotated[str, typer.Argument(help="jobs/ID or ID.")],
    directory: Annotated[Path, typer.Argument(help="Where the parts, errors and manifest go.")],
) -> None:
    """Download an ended job's result parts, errors object and manifest, checking their sums."""
    with _stub() as stub:
        found = _call(stub.GetJob, pb.GetJobRequest(name=_name(job))).job
    if found.state in ACTIVE:
        _err.print(f"{found.name} is {_state(found)}; results are ready when it ends")
        raise typer.Exit(1)
    directory.mkdir(parents=True, exist_ok=True)
    objects = [*found.results]
    if found.HasField("errors"):
        objects.append(found.errors)
    if found.HasField("manifest"):
        objects.append(found.manifest)
    for stored in objects:
        target = directory / stored.uri.rsplit("/", 1)[1]
        _fetch(stored.presigned_url, target, stored.sha256)
        _out.print(str(target))
