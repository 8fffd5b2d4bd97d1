"""`tensorway batch`: submit a job (uploading a local file first, through a presigned URL the API
hands out), follow it with a live progress bar, and read its status, list, cancel it or download
its results, through the context's Envoy (the token's tenant, with the batch scope) or, inside the
network, against the batch API at `--api` or TENSORWAY_BATCH_ADDRESS."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import grpc
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from tensorway.batch.domain import job_id_of, job_name
from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.batch.v1 import batch_service_pb2_grpc as pb_grpc
from tensorway.cli.connection import Target
from tensorway.cli.errors import ExitCode, fail
from tensorway.cli.output import STDERR, STDOUT, OutputFormat, OutputOption, emit, key_column, print_table
from tensorway.runtime.context import DEFAULT_TENANT, Scope, identity_metadata

batch_app = typer.Typer(
    name="batch",
    help="Run batch inference jobs over files in object storage.",
    no_args_is_help=True,
)
CALL_TIMEOUT_SECONDS = 30.0
# Per socket operation, not for the whole upload: a large file takes as long as it takes.
UPLOAD_TIMEOUT_SECONDS = 60.0
ACTIVE = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
FORMATS = {"jsonl": pb.INPUT_FORMAT_JSONL, "npy": pb.INPUT_FORMAT_NPY, "parquet": pb.INPUT_FORMAT_PARQUET}
OUTPUT_FORMATS = {"jsonl": pb.OUTPUT_FORMAT_JSONL, "parquet": pb.OUTPUT_FORMAT_PARQUET}


JobArgument = Annotated[str, typer.Argument(help="jobs/ID or ID.")]
_target = Target("batch", "--api", "TENSORWAY_BATCH_ADDRESS", CALL_TIMEOUT_SECONDS)


@batch_app.callback()
def batch(
    *,
    api: Annotated[
        str,
        _target.address_option(
            "Inside the network: the batch API's gRPC address, instead of the context's Envoy."
        ),
    ] = "",
    tenant: Annotated[
        str,
        typer.Option(
            envvar="TENSORWAY_TENANT",
            help="With --api: act as this tenant (x-tenant-id, with the batch scope), as Envoy would"
            " for its token. Through Envoy the token says the tenant.",
        ),
    ] = "",
) -> None:
    """Run batch inference jobs over files in object storage."""
    _target.address, _target.tenant = api, tenant


@contextmanager
def _stub() -> Iterator[pb_grpc.BatchServiceStub]:
    # At an internal address the command asserts the identity Envoy would set from a token.
    connection = _target.connect(identity_metadata(_target.tenant or DEFAULT_TENANT, (Scope.BATCH,)))
    if connection.through_envoy and _target.tenant:
        STDERR.print(f"--tenant {escape(_target.tenant)} is ignored: through Envoy the token says the tenant")
    with connection.channel() as channel:
        yield pb_grpc.BatchServiceStub(channel)


def _on_job(rpc: str, job: str) -> pb.Job:
    """The job after `rpc` (GetJob, CancelJob: an RPC that takes a job's name and answers it)."""
    with _stub() as stub:
        answered: pb.Job = _target.call(getattr(stub, rpc), getattr(pb, f"{rpc}Request")(name=_name(job))).job
    return answered


def _name(job: str) -> str:
    return job if job_id_of(job) is not None else job_name(job)


def _state(job: pb.Job) -> str:
    return pb.JobState.Name(job.state).removeprefix("JOB_STATE_")


def _upload(stub: pb_grpc.BatchServiceStub, path: Path) -> str:
    """Upload a local file through a presigned URL the API hands out (no storage keys needed
    here); returns the s3:// URI a job takes as its input."""
    size = path.stat().st_size
    upload = _target.call(stub.CreateUpload, pb.CreateUploadRequest(file_name=path.name, size_bytes=size))
    if urlsplit(upload.upload_url).scheme not in ("http", "https"):
        STDERR.print(
            f"[red]the API gave an upload URL that is not http(s): {escape(upload.upload_url)}[/red]"
        )
        raise typer.Exit(ExitCode.FAILED)
    with path.open("rb") as body:
        request = urllib.request.Request(  # noqa: S310  # nosec B310: http(s), checked above
            upload.upload_url, data=body, method="PUT", headers={"Content-Length": str(size)}
        )
        try:
            with urllib.request.urlopen(request, timeout=UPLOAD_TIMEOUT_SECONDS):  # noqa: S310  # nosec B310
                pass
        except urllib.error.HTTPError as error:
            STDERR.print(f"[red]upload of {escape(path.name)} refused: HTTP {error.code}[/red]")
            raise typer.Exit(ExitCode.FAILED) from None
    return upload.input_uri


def _print_job(job: pb.Job) -> None:
    # Values are names and URLs: never cut, since a cut URL does not work.
    table = Table(key_column("key"), key_column("value"), show_header=False, box=None)
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
    print_table(STDOUT, table)


def eta_text(job: pb.Job) -> str:
    """The job's time left as its progress bar shows it. The API estimates it, as the rows left
    over the rows per second the job finished in the last ten seconds of its watch (since it
    started, for a single look), so it follows the job's own pace, not this terminal's updates."""
    if job.progress.HasField("eta"):
        seconds = round(job.progress.eta.ToTimedelta().total_seconds())
        hours, rest = divmod(seconds, 3600)
        return f"eta {hours}:{rest // 60:02d}:{rest % 60:02d}"
    # Queued, or running with no rows finished yet: no pace to estimate from.
    return "eta -:--:--" if job.state in ACTIVE else ""


def _emit_job(job: pb.Job, output: OutputFormat) -> None:
    """The job for people, or its protobuf JSON, which carries every result's presigned URL."""
    emit(output, job, lambda: _print_job(job))


def _watch(stub: pb_grpc.BatchServiceStub, name: str) -> pb.Job:
    """Follow the job on a progress bar until it ends; returns its final state."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows  {task.fields[rate]:,.0f}/s"),
        TextColumn("{task.fields[eta]}"),
    )
    job = pb.Job()
    with Progress(*columns, console=STDERR, transient=False) as bar:
        task = bar.add_task("QUEUED", total=None, rate=0.0, eta=eta_text(job))
        try:
            for response in stub.WatchJob(pb.WatchJobRequest(name=name)):
                job = response.job
                progress = job.progress
                bar.update(
                    task,
                    description=_state(job),
                    total=progress.rows_total or None,
                    completed=progress.rows_done + progress.rows_failed,
                    rate=progress.rows_per_second,
                    eta=eta_text(job),
                )
        except grpc.RpcError as error:
            raise fail(error) from None
    return job


@batch_app.command()
def submit(
    source: Annotated[
        str,
        typer.Argument(
            help="A local .jsonl/.npy/.parquet file (uploaded first), s3://bucket/key, or "
            "s3://bucket/prefix/ of .parquet files."
        ),
    ],
    *,
    model: Annotated[str, typer.Option(help="The model to run.")],
    version: Annotated[str, typer.Option(help="The model version; empty lets the router choose.")] = "",
    input_format: Annotated[
        str, typer.Option("--format", help="jsonl, npy or parquet; taken from the extension when empty.")
    ] = "",
    output_format: Annotated[
        str,
        typer.Option(help="Result parts: jsonl or parquet; default parquet for Parquet inputs, else jsonl."),
    ] = "",
    columns: Annotated[
        list[str] | None,
        typer.Option(
            "--column",
            help="Parquet: INPUT=COLUMN reads a model input from a column of another name; repeatable.",
        ),
    ] = None,
    id_column: Annotated[
        str, typer.Option(help='Parquet: the column of row ids (default "id" when there is one).')
    ] = "",
    shard_size: Annotated[int, typer.Option(help="Rows per shard; 0 takes the server's default.")] = 0,
    priority: Annotated[
        int, typer.Option(help="Among your own jobs, higher runs first (0-9 by default).")
    ] = 0,
    wait: Annotated[bool, typer.Option("--wait", help="Follow progress until the job ends.")] = False,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Create a job; with --wait, show its progress (on stderr) and print the result URLs.

    With -o json or yaml, stdout holds one document: the created job, or with --wait the ended one
    with its presigned result URLs. A job that ends other than SUCCEEDED exits 1.
    """
    if input_format and input_format not in FORMATS:
        raise typer.BadParameter("jsonl, npy or parquet", param_hint="--format")
    if output_format and output_format not in OUTPUT_FORMATS:
        raise typer.BadParameter("jsonl or parquet", param_hint="--output-format")
    mapping = dict(column.partition("=")[::2] for column in columns or ())
    if any(not name or not column for name, column in mapping.items()):
        raise typer.BadParameter("INPUT=COLUMN", param_hint="--column")
    path = Path(source)
    if not source.startswith("s3://") and not path.is_file():
        raise typer.BadParameter(f"{source!r} is neither a file nor an s3:// URI", param_hint="SOURCE")
    with _stub() as stub:
        if source.startswith("s3://"):
            input_uri = source
        else:
            input_uri = _upload(stub, path)
            STDERR.print(f"uploaded {escape(source)} to {escape(input_uri)}")
        job = pb.Job(
            model=model,
            model_version=version,
            input_uri=input_uri,
            input_format=FORMATS.get(input_format, pb.INPUT_FORMAT_UNSPECIFIED),
            output_format=OUTPUT_FORMATS.get(output_format, pb.OUTPUT_FORMAT_UNSPECIFIED),
            input_columns=mapping,
            id_column=id_column,
            shard_size=shard_size,
            priority=priority,
        )
        created = _target.call(stub.CreateJob, pb.CreateJobRequest(job=job, request_id=uuid.uuid4().hex)).job
        if not wait:
            emit(output, created, lambda: STDOUT.print(created.name))
            return
        if output is OutputFormat.TABLE:
            STDOUT.print(created.name)
        else:
            STDERR.print(created.name)
        final = _watch(stub, created.name)
    _emit_job(final, output)
    if final.state != pb.JOB_STATE_SUCCEEDED:
        raise typer.Exit(ExitCode.FAILED)


@batch_app.command()
def status(job: JobArgument, output: OutputOption = OutputFormat.TABLE) -> None:
    """Show a job: state, progress and, when it has ended, its result URLs."""
    _emit_job(_on_job("GetJob", job), output)


@batch_app.command("list")
def list_jobs(
    filter_text: Annotated[str, typer.Option("--filter", help='e.g. "state=RUNNING AND model=digits".')] = "",
    page_size: Annotated[int, typer.Option(help="Jobs a page.")] = 50,
    after: Annotated[str, typer.Option("--page-token", help="Where a previous page ended.")] = "",
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """The tenant's jobs, newest first."""
    with _stub() as stub:
        request = pb.ListJobsRequest(filter=filter_text, page_size=page_size, page_token=after)
        page = _target.call(stub.ListJobs, request)

    def table() -> None:
        # Job names are what the other commands take: never cut, so they can be copied whole.
        rows = Table(key_column("job"), "state", key_column("model"), "rows done", "rows failed")
        rows.add_column("rows total")
        rows.add_column("created", no_wrap=True)
        for j in page.jobs:
            p = j.progress
            created = j.create_time.ToDatetime().isoformat(timespec="seconds")
            counts = (str(p.rows_done), str(p.rows_failed), str(p.rows_total))
            cells = (j.name, _state(j), j.model, *counts, created)
            rows.add_row(*(escape(c) for c in cells))
        print_table(STDOUT, rows)
        if page.next_page_token:
            STDERR.print(f"more: --page-token {page.next_page_token}")

    emit(output, page, table)


@batch_app.command()
def cancel(job: JobArgument, output: OutputOption = OutputFormat.TABLE) -> None:
    """Cancel a job: shards not yet finished are dropped."""
    _emit_job(_on_job("CancelJob", job), output)


def _fetch(url: str, target: Path, sha256: str) -> None:
    # Presigned URLs are http(s) by construction; the sum proves the bytes are the job's.
    with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_SECONDS) as response:  # noqa: S310  # nosec B310
        data = response.read()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        STDERR.print(f"[red]{escape(target.name)}: checksum mismatch[/red]")
        raise typer.Exit(ExitCode.FAILED)
    target.write_bytes(data)


@batch_app.command()
def download(
    job: JobArgument,
    directory: Annotated[Path, typer.Argument(help="Where the parts, errors and manifest go.")],
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Download an ended job's result parts, errors object and manifest, checking their sums.

    Prints each file's path; as JSON, {"job": NAME, "files": [PATH, ...]}.
    """
    with _stub() as stub:
        found = _target.call(stub.GetJob, pb.GetJobRequest(name=_name(job))).job
    if found.state in ACTIVE:
        STDERR.print(f"{found.name} is {_state(found)}; results are ready when it ends")
        raise typer.Exit(ExitCode.CLIENT_ERROR)
    directory.mkdir(parents=True, exist_ok=True)
    objects = [*found.results]
    if found.HasField("errors"):
        objects.append(found.errors)
    if found.HasField("manifest"):
        objects.append(found.manifest)
    files = []
    for stored in objects:
        target = directory / stored.uri.rsplit("/", 1)[1]
        _fetch(stored.presigned_url, target, stored.sha256)
        files.append(str(target))
    emit(output, {"job": found.name, "files": files}, lambda: typer.echo("\n".join(files)))
