"""`tensorway models`: register, list, show, deploy, promote, split traffic and roll out.

Through the context's Envoy, the token says who calls: reads need models.read, writes models.write
(an admin token; the local stack's context has one). At an internal address (`--registry` or
TENSORWAY_REGISTRY_ADDRESS) it talks to the registry directly, as an operator: every call carries
the admin identity of `access.OPERATOR_TENANT`, which may write and sees pool addresses."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import duration_pb2, field_mask_pb2
from rich.markup import escape
from rich.table import Table

from tensorway.cli.connection import Target
from tensorway.cli.errors import ExitCode, fail
from tensorway.cli.output import (
    STDERR,
    STDOUT,
    OutputFormat,
    OutputOption,
    emit,
    key_column,
    message_data,
    print_table,
)
from tensorway.common.v1 import tensor_pb2
from tensorway.registry.access import OPERATOR_TENANT, admin_metadata
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.registry.v1 import registry_service_pb2_grpc as pb_grpc

models_app = typer.Typer(
    name="models",
    help="Register models and versions, deploy them to pools and split their traffic.",
    no_args_is_help=True,
)

STAGES = {name.removeprefix("STAGE_").lower(): value for name, value in pb.Stage.items() if value}
# `promote` without --to moves a version one step along its usual path.
NEXT_STAGE = {pb.STAGE_DRAFT: pb.STAGE_STAGING, pb.STAGE_STAGING: pb.STAGE_PRODUCTION}
CALL_TIMEOUT_SECONDS = 10.0


_registry = Target("registry", "--registry", "TENSORWAY_REGISTRY_ADDRESS", CALL_TIMEOUT_SECONDS)


@models_app.callback()
def models(
    registry: Annotated[
        str,
        _registry.address_option(
            "Inside the network: the registry's gRPC address, host:port, called as an operator"
            " instead of through the context's Envoy."
        ),
    ] = "",
) -> None:
    """Register models and versions, deploy them to pools and split their traffic."""
    _registry.address = registry


@contextmanager
def _stub() -> Iterator[pb_grpc.RegistryServiceStub]:
    with _registry.connect(admin_metadata(OPERATOR_TENANT)).channel() as channel:
        yield pb_grpc.RegistryServiceStub(channel)


def _is_not_found(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.NOT_FOUND


def _stage(value: int) -> str:
    return pb.Stage.Name(pb.Stage.ValueType(value)).removeprefix("STAGE_")


def _specs(specs: Sequence[tensor_pb2.TensorSpec]) -> str:
    return ", ".join(f"{s.name} {s.datatype}{list(s.shape)}" for s in specs)


def _parse_spec(text: str, option: str) -> tensor_pb2.TensorSpec:
    """NAME:DATATYPE:SHAPE, the shape as comma-separated dimensions (-1 is dynamic)."""
    try:
        name, datatype, shape = text.split(":")
        dims = [int(dim) for dim in shape.split(",") if dim]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not NAME:DATATYPE:DIMS, e.g. input:FP32:64", param_hint=option
        ) from None
    return tensor_pb2.TensorSpec(name=name, datatype=datatype.upper(), shape=dims)


def _parse_pairs(pairs: Sequence[str], option: str) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=option)
        parsed[key] = value
    return parsed


def _add_row(table: Table, *cells: str) -> None:
    # Names, labels and shapes are data, not rich markup ("[64]" is a shape, not a tag).
    table.add_row(*(escape(cell) for cell in cells))


def _version_table(versions: Sequence[pb.ModelVersion]) -> Table:
    table = Table(
        key_column("version"), "stage", "platform", "inputs", "outputs", "max batch",
        key_column("artifact"), "metrics",
    )  # fmt: skip
    for v in versions:
        metrics = ", ".join(f"{k}={value:g}" for k, value in sorted(v.metrics.items()))
        _add_row(
            table, v.name.rsplit("/", 1)[1], _stage(v.stage), v.platform, _specs(v.inputs), _specs(v.outputs),
            str(v.max_batch_size), v.artifact_uri, metrics,
        )  # fmt: skip
    return table


def _state(value: int) -> str:
    return pb.ModelVersionState.Name(pb.ModelVersionState.ValueType(value)).removeprefix(
        "MODEL_VERSION_STATE_"
    )


def _readiness(readiness: pb.VersionReadiness) -> str:
    """`2: FAILED 0/1 (why)`: the version's state on its pool, its ready and needed endpoints, and
    the reasons its Tritons give."""
    if readiness.state == pb.MODEL_VERSION_STATE_UNSPECIFIED:
        return f"{readiness.version}: not reported"
    reasons = sorted(
        {t.reason for t in readiness.tritons if t.reason and t.state != pb.MODEL_VERSION_STATE_READY}
    )
    counts = f"{readiness.ready_endpoints}/{readiness.required_endpoints}"
    text = f"{readiness.version}: {_state(readiness.state)} {counts}"
    return text + (f" ({'; '.join(reasons)})" if reasons else "")


def _deployment_table(deployments: Sequence[pb.Deployment]) -> Table:
    table = Table(key_column("deployment"), key_column("pool"), "traffic", "aliases", "shadow", "readiness")
    for d in deployments:
        _add_row(
            table,
            d.name.rsplit("/", 1)[1],
            d.pool.removeprefix("pools/"),
            ", ".join(f"{t.version}: {t.weight}%" for t in d.traffic),
            ", ".join(f"{alias} → {version}" for alias, version in sorted(d.aliases.items())),
            f"{d.shadow.version}: {d.shadow.percent}%" if d.HasField("shadow") else "",
            "\n".join(_readiness(r) for r in d.readiness),
        )
    return table


def _upload(source: Path, model: str, s3_endpoint: str, access_key: str, secret_key: str) -> pb.ModelVersion:
    """The Triton model directory `source` uploaded to S3 (the local stack's unless given), as a
    version with that artifact and the signature its config.pbtxt declares."""
    from tensorway.devstack import DevStackSettings, status
    from tensorway.registry.model_directory import (
        ModelDirectory,
        ModelDirectoryError,
        s3_client,
        version_from_config,
    )

    try:
        directory = ModelDirectory.read(source)
        body = version_from_config(directory.config_text)
    except (ModelDirectoryError, OSError) as error:
        raise typer.BadParameter(str(error), param_hint="--from") from None
    if not s3_endpoint:
        local = status().endpoints().get("s3")
        if local is None:
            raise typer.BadParameter(
                "no S3 to upload to: start the local stack (`tensorway dev up`) or pass --s3-endpoint",
                param_hint="--from",
            )
        s3_endpoint = local.url or f"http://{local.address}"
        defaults = DevStackSettings()
        access_key, secret_key = access_key or defaults.s3_access_key, secret_key or defaults.s3_secret_key
    body.artifact_uri = directory.upload(s3_client(s3_endpoint, access_key, secret_key), model)
    return body


@models_app.command("register")
def register_command(
    model: Annotated[str, typer.Argument(help="Model id, the name Triton serves it by, e.g. digits.")],
    *,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="A Triton model directory (config.pbtxt and one version folder): uploaded to S3 and"
            " registered with the signature its config.pbtxt declares.",
        ),
    ] = None,
    artifact_uri: Annotated[
        str, typer.Option("--artifact-uri", help="Where the artifact lives, e.g. s3://models/digits/1/.")
    ] = "",
    inputs: Annotated[
        list[str] | None,
        typer.Option("--input-spec", help="An input, NAME:DATATYPE:DIMS, e.g. input:FP32:64; repeat."),
    ] = None,
    outputs: Annotated[
        list[str] | None,
        typer.Option("--output-spec", help="An output, NAME:DATATYPE:DIMS, e.g. label:INT64:1; repeat."),
    ] = None,
    platform: Annotated[str, typer.Option(help="Backend platform.")] = "onnxruntime_onnx",
    max_batch_size: Annotated[int, typer.Option(help="Largest batch; 0 when the model does not batch.")] = 0,
    s3_endpoint: Annotated[
        str,
        typer.Option(
            envvar="TENSORWAY_S3_ENDPOINT",
            help="With --from: the S3 to upload to; the local stack's by default.",
        ),
    ] = "",
    s3_access_key: Annotated[
        str, typer.Option(envvar="TENSORWAY_S3_ACCESS_KEY", help="With --from: S3 access key.")
    ] = "",
    s3_secret_key: Annotated[
        str, typer.Option(envvar="TENSORWAY_S3_SECRET_KEY", help="With --from: S3 secret key.")
    ] = "",
    version: Annotated[str, typer.Option(help="Version id; default the next number.")] = "",
    description: Annotated[str, typer.Option(help="What the model does (when it is new).")] = "",
    labels: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE (when the model is new); repeat.")
    ] = None,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Register a version of a model, creating the model first if it is new.

    With --from, a Triton model directory on disk is uploaded and registered in one step; its
    signature comes from its config.pbtxt unless --input-spec/--output-spec say otherwise."""
    body = pb.ModelVersion(
        platform=platform,
        inputs=[_parse_spec(spec, "--input-spec") for spec in inputs or []],
        outputs=[_parse_spec(spec, "--output-spec") for spec in outputs or []],
        max_batch_size=max_batch_size,
        artifact_uri=artifact_uri,
    )
    if source is not None:
        uploaded = _upload(source, model, s3_endpoint, s3_access_key, s3_secret_key)
        if inputs or outputs:
            uploaded.ClearField("inputs")
            uploaded.ClearField("outputs")
            uploaded.inputs.extend(body.inputs)
            uploaded.outputs.extend(body.outputs)
        body = uploaded
    elif not (artifact_uri and inputs and outputs):
        raise typer.BadParameter(
            "register a Triton model directory with --from, "
            "or give --artifact-uri, --input-spec and --output-spec"
        )
    name = f"models/{model}"
    with _stub() as stub:
        try:
            stub.GetModel(pb.GetModelRequest(name=name), timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            if not _is_not_found(error):
                raise fail(error) from None
            new = pb.Model(name=name, description=description, labels=_parse_pairs(labels or [], "--label"))
            _registry.call(stub.CreateModel, pb.CreateModelRequest(model=new))
        created = _registry.call(
            stub.CreateModelVersion,
            pb.CreateModelVersionRequest(parent=name, model_version_id=version, model_version=body),
        ).model_version
    emit(output, created, lambda: print_table(STDOUT, _version_table([created])))


@models_app.command("list")
def list_command(
    filter_text: Annotated[
        str, typer.Option("--filter", help='Label filter, e.g. "team=vision AND tier=gold".')
    ] = "",
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """List models, with their labels and when they last changed."""
    # Every page, as one ListModelsResponse with no page token left.
    listed = pb.ListModelsResponse()
    with _stub() as stub:
        request = pb.ListModelsRequest(filter=filter_text, page_size=200)
        while True:
            page = _registry.call(stub.ListModels, request)
            listed.models.extend(page.models)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token

    def table() -> None:
        rows = Table(key_column("model"), "description", "labels", "updated")
        for m in listed.models:
            labels = ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items()))
            updated = m.update_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            _add_row(rows, m.name.removeprefix("models/"), m.description, labels, updated)
        print_table(STDOUT, rows)

    emit(output, listed, table)


@models_app.command("show")
def show_command(
    model: Annotated[str, typer.Argument(help="Model id.")], output: OutputOption = OutputFormat.TABLE
) -> None:
    """A model's versions, deployments and the route routers get for it.

    As JSON: {"model": Model, "model_versions": [...], "deployments": [...], "route": ResolveModelResponse
    or null when it is not deployed, "rollouts": [Rollout, ...] the newest first}.
    """
    name = f"models/{model}"
    with _stub() as stub:
        found = _registry.call(stub.GetModel, pb.GetModelRequest(name=name)).model
        versions = _registry.call(
            stub.ListModelVersions, pb.ListModelVersionsRequest(parent=name, page_size=1000)
        ).model_versions
        deployments = _registry.call(
            stub.ListDeployments, pb.ListDeploymentsRequest(parent=name, page_size=1000)
        ).deployments
        rollouts = _registry.call(
            stub.ListRollouts, pb.ListRolloutsRequest(parent=name, page_size=ROLLOUTS_SHOWN)
        ).rollouts
        try:
            resolved: pb.ResolveModelResponse | None = stub.ResolveModel(
                pb.ResolveModelRequest(name=name), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.RpcError as error:
            if not _is_not_found(error):
                raise fail(error) from None
            resolved = None
    document: dict[str, Any] = {
        "model": message_data(found),
        "model_versions": [message_data(v) for v in versions],
        "deployments": [message_data(d) for d in deployments],
        "route": None if resolved is None else message_data(resolved),
        "rollouts": [message_data(r) for r in rollouts],
    }

    def table() -> None:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(found.labels.items()))
        STDOUT.print(f"[bold]{escape(model)}[/bold]  {escape(found.description)}  {escape(labels)}")
        print_table(STDOUT, _version_table(versions))
        print_table(STDOUT, _deployment_table(deployments))
        if rollouts:
            STDOUT.print(_rollout_line(rollouts[0]))
        if resolved is None:
            STDOUT.print("not deployed: no route")
            return
        route = Table(
            key_column("routed version"), "weight", "state", key_column("pool"), key_column("endpoints"),
            title=f"route (default version {resolved.version})",
        )  # fmt: skip
        for v in resolved.route.versions:
            _add_row(
                route, v.version, str(v.weight), _state(v.state), v.pool.removeprefix("pools/"),
                ", ".join(v.endpoints),
            )  # fmt: skip
        print_table(STDOUT, route)

    emit(output, document, table)


@models_app.command("deploy")
def deploy_command(
    model: Annotated[str, typer.Argument(help="Model id.")],
    *,
    version: Annotated[str, typer.Option(help="The version that gets all the traffic.")],
    pool: Annotated[str, typer.Option(help="The pool that serves it.")],
    endpoints: Annotated[
        list[str] | None,
        typer.Option("--endpoint", help="host:port of an orchestrator; creates the pool if new."),
    ] = None,
    deployment: Annotated[str, typer.Option(help="Deployment id.")] = "main",
    aliases: Annotated[list[str] | None, typer.Option("--alias", help="ALIAS=VERSION; repeat.")] = None,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Send a model's traffic on a pool to one version; creates the deployment (and pool) if new."""
    body = pb.Deployment(
        name=f"models/{model}/deployments/{deployment}",
        pool=f"pools/{pool}",
        traffic=[pb.TrafficSplit(version=version, weight=100)],
        aliases=_parse_pairs(aliases or [], "--alias"),
    )
    with _stub() as stub:
        if endpoints:
            try:
                stub.GetPool(pb.GetPoolRequest(name=f"pools/{pool}"), timeout=CALL_TIMEOUT_SECONDS)
            except grpc.RpcError as error:
                if not _is_not_found(error):
                    raise fail(error) from None
                _registry.call(
                    stub.CreatePool,
                    pb.CreatePoolRequest(pool=pb.Pool(name=f"pools/{pool}", endpoints=endpoints)),
                )
        try:
            stub.GetDeployment(pb.GetDeploymentRequest(name=body.name), timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            if not _is_not_found(error):
                raise fail(error) from None
            saved = _registry.call(
                stub.CreateDeployment,
                pb.CreateDeploymentRequest(
                    parent=f"models/{model}", deployment_id=deployment, deployment=body
                ),
            ).deployment
        else:
            saved = _registry.call(
                stub.UpdateDeployment,
                pb.UpdateDeploymentRequest(
                    deployment=body,
                    update_mask=field_mask_pb2.FieldMask(paths=["pool", "traffic", "aliases"]),
                ),
            ).deployment
    emit(output, saved, lambda: print_table(STDOUT, _deployment_table([saved])))


@models_app.command("promote")
def promote_command(
    model: Annotated[str, typer.Argument(help="Model id.")],
    version: Annotated[str, typer.Argument(help="Version id.")],
    to: Annotated[
        str | None,
        typer.Option(
            help=f"Target stage: {', '.join(STAGES)}; default the next (draft → staging → production)."
        ),
    ] = None,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Move a version to another stage (default: the next one), under the registry's stage rules."""
    name = f"models/{model}/versions/{version}"
    with _stub() as stub:
        if to is None:
            current = _registry.call(stub.GetModelVersion, pb.GetModelVersionRequest(name=name)).model_version
            if current.stage not in NEXT_STAGE:
                STDERR.print(f"{escape(name)} is {_stage(current.stage)}; say where with --to")
                raise typer.Exit(ExitCode.CLIENT_ERROR)
            target = NEXT_STAGE[current.stage]
        elif to.lower() in STAGES:
            target = STAGES[to.lower()]
        else:
            raise typer.BadParameter(f"{to!r}: one of {', '.join(STAGES)}", param_hint="--to")
        moved = _registry.call(
            stub.TransitionModelVersionStage, pb.TransitionModelVersionStageRequest(name=name, stage=target)
        )

    def table() -> None:
        print_table(STDOUT, _version_table([moved.model_version]))
        for demoted in moved.demoted_versions:
            STDOUT.print(f"moved {escape(demoted.name)} back to {_stage(demoted.stage)}")

    emit(output, moved, table)


@models_app.command("traffic")
def traffic_command(
    model: Annotated[str, typer.Argument(help="Model id.")],
    weights: Annotated[list[str], typer.Argument(help="VERSION=PERCENT for each version; they sum to 100.")],
    deployment: Annotated[str, typer.Option(help="Deployment id.")] = "main",
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Split a deployment's traffic across versions, e.g. `traffic digits 1=90 2=10`."""
    try:
        split = [
            pb.TrafficSplit(version=v, weight=int(w)) for v, w in _parse_pairs(weights, "WEIGHTS").items()
        ]
    except ValueError:
        raise typer.BadParameter("weights are whole percents, e.g. 1=90 2=10", param_hint="WEIGHTS") from None
    body = pb.Deployment(name=f"models/{model}/deployments/{deployment}", traffic=split)
    with _stub() as stub:
        saved = _registry.call(
            stub.UpdateDeployment,
            pb.UpdateDeploymentRequest(
                deployment=body, update_mask=field_mask_pb2.FieldMask(paths=["traffic"])
            ),
        ).deployment
    emit(output, saved, lambda: print_table(STDOUT, _deployment_table([saved])))


# Measured rollouts

ROLLOUTS_SHOWN = 5
ROLLOUT_POLL_SECONDS = 1.0
_ACTIVE_ROLLOUT_STATES = (pb.ROLLOUT_STATE_RUNNING, pb.ROLLOUT_STATE_PAUSED)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_duration(text: str, option: str) -> duration_pb2.Duration:
    match = _DURATION.match(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration such as 90s, 5m or 500ms", param_hint=option)
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(round(float(match[1]) * _DURATION_UNITS[match[2]] * 1000))
    return duration


def _parse_steps(text: str) -> list[int]:
    try:
        return [int(step) for step in text.split(",")]
    except ValueError:
        raise typer.BadParameter(
            "percents separated by commas, e.g. 5,25,50,100", param_hint="--steps"
        ) from None


def _rollout_state(value: int) -> str:
    return pb.RolloutState.Name(pb.RolloutState.ValueType(value)).removeprefix("ROLLOUT_STATE_")


def _rollout_line(rollout: pb.Rollout) -> str:
    step = f"step {rollout.step_index + 1}/{len(rollout.steps)} ({rollout.steps[rollout.step_index]}%)"
    figures = rollout.to_figures
    line = (
        f"rollout {escape(rollout.name)}: {rollout.from_version} → {rollout.to_version}"
        f" {_rollout_state(rollout.state)}, {step};"
        f" version {rollout.to_version}: {figures.requests} requests, {figures.server_errors} server errors,"
        f" p99 {figures.p99_seconds * 1000:g} ms"
    )
    return line + (f"\n  {escape(rollout.reason)}" if rollout.reason else "")


def _active_rollout(stub: pb_grpc.RegistryServiceStub, model: str) -> pb.Rollout:
    latest = _registry.call(
        stub.ListRollouts, pb.ListRolloutsRequest(parent=f"models/{model}", page_size=1)
    ).rollouts
    if not latest or latest[0].state not in _ACTIVE_ROLLOUT_STATES:
        STDERR.print(f"model {escape(model)} has no rollout running or paused")
        raise typer.Exit(ExitCode.CLIENT_ERROR)
    return latest[0]


@models_app.command("rollout")
def rollout_command(
    model: Annotated[str, typer.Argument(help="Model id.")],
    *,
    version: Annotated[str, typer.Option(help="The version to roll out.")] = "",
    steps: Annotated[str, typer.Option(help="The new version's percent at each step, rising to 100.")] = "",
    interval: Annotated[
        str, typer.Option(help="How long each step runs before it is judged: 60s, 5m...")
    ] = "",
    max_error_rate: Annotated[
        float | None,
        typer.Option(help="How much the new version's server error rate may exceed the old one's."),
    ] = None,
    max_p99_ratio: Annotated[
        float | None, typer.Option(help="How many times the old version's p99 latency the new one's may be.")
    ] = None,
    max_mismatch_share: Annotated[
        float | None, typer.Option(help="Share of shadow comparisons that may disagree (where one shadows).")
    ] = None,
    min_requests: Annotated[
        int | None, typer.Option(help="Answers of the new version in a step before it is judged.")
    ] = None,
    from_version: Annotated[
        str, typer.Option(help="The version giving up traffic; default the heaviest.")
    ] = "",
    deployment: Annotated[str, typer.Option(help="Deployment id; default the model's only one.")] = "",
    wait: Annotated[bool, typer.Option("--wait", help="Follow the rollout until it ends.")] = False,
    pause: Annotated[bool, typer.Option("--pause", help="Hold the model's rollout at its step.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Let the model's paused rollout go on.")] = False,
    abort: Annotated[
        bool, typer.Option("--abort", help="End the model's rollout; the old version gets its traffic back.")
    ] = False,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Move traffic to a version step by step while it keeps up with the current one, e.g.
    `rollout digits --version 2 --steps 5,25,50,100 --interval 60s --wait`; the registry rolls it
    back by itself when a step breaks a bound. `--pause`, `--resume` and `--abort` act on the
    model's rollout in progress. Exits non-zero when a followed rollout does not succeed."""
    actions = [
        name for name, chosen in (("--pause", pause), ("--resume", resume), ("--abort", abort)) if chosen
    ]
    if len(actions) > 1 or (actions and version) or not (actions or version):
        raise typer.BadParameter(
            "either --version V to start a rollout, or one of --pause, --resume, --abort"
        )
    with _stub() as stub:
        if actions:
            name = _active_rollout(stub, model).name
            if pause:
                rollout = _registry.call(stub.PauseRollout, pb.PauseRolloutRequest(name=name)).rollout
            elif resume:
                rollout = _registry.call(stub.ResumeRollout, pb.ResumeRolloutRequest(name=name)).rollout
            else:
                rollout = _registry.call(stub.AbortRollout, pb.AbortRolloutRequest(name=name)).rollout
        else:
            bounds = pb.RolloutBounds()
            for field, value in (
                ("max_error_rate", max_error_rate),
                ("max_p99_ratio", max_p99_ratio),
                ("max_mismatch_share", max_mismatch_share),
                ("min_requests", min_requests),
            ):
                if value is not None:
                    setattr(bounds, field, value)
            body = pb.Rollout(
                to_version=version,
                from_version=from_version,
                deployment=f"models/{model}/deployments/{deployment}" if deployment else "",
                steps=_parse_steps(steps) if steps else [],
                bounds=bounds,
            )
            if interval:
                body.interval.CopyFrom(_parse_duration(interval, "--interval"))
            rollout = _registry.call(
                stub.StartRollout, pb.StartRolloutRequest(parent=f"models/{model}", rollout=body)
            ).rollout
        if wait:
            rollout = _follow(stub, rollout, output)
    emit(output, rollout, lambda: STDOUT.print(_rollout_line(rollout)))
    if wait and rollout.state != pb.ROLLOUT_STATE_SUCCEEDED:
        raise typer.Exit(ExitCode.CLIENT_ERROR)


def _follow(stub: pb_grpc.RegistryServiceStub, rollout: pb.Rollout, output: OutputFormat) -> pb.Rollout:
    """Poll the rollout until it ends, printing each step it takes (in table output)."""
    shown = (rollout.state, rollout.step_index)
    while rollout.state in _ACTIVE_ROLLOUT_STATES:
        time.sleep(ROLLOUT_POLL_SECONDS)
        rollout = _registry.call(stub.GetRollout, pb.GetRolloutRequest(name=rollout.name)).rollout
        if (rollout.state, rollout.step_index) != shown and output is OutputFormat.TABLE:
            shown = (rollout.state, rollout.step_index)
            STDOUT.print(_rollout_line(rollout))
    return rollout
