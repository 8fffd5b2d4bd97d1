"""Registers the demo models in the local stack's registry and sends the first request.

Each demo model's directory (as the Triton's repository holds it) is uploaded to the stack's S3 and
registered with that artifact and the signature its config.pbtxt declares, so every start runs
the path a user's model takes: the orchestrator fetches the artifact, loads and warms it, and the
version gets traffic once it reports it ready.

The registration is the stack's own doing: it writes as `access.SYSTEM_TENANT` with admin scopes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import field_mask_pb2

from tensorway.common.v1 import tensor_pb2
from tensorway.devstack._errors import DevStackError
from tensorway.devstack._services import LOCAL_POOL, ROUTED_DEMO_MODELS, endpoint_key
from tensorway.devstack._settings import DevStackSettings
from tensorway.devstack._state import StackState
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.inference.v1 import inference_service_pb2_grpc as inference_grpc
from tensorway.registry.access import SYSTEM_TENANT, admin_channel
from tensorway.registry.model_directory import ModelDirectory, s3_client, version_from_config
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc

DEMO_VERSION = "1"
DEMO_DEPLOYMENT = "local"


def _create(method: Callable[..., object], request: object, timeout: float) -> None:
    """Run a Create call; what exists already from an earlier `dev up` is kept."""
    try:
        method(request, timeout=timeout)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


def _demo_repository(state: StackState) -> Path | None:
    """Where the stack's Triton keeps the demo models it built (devstack._triton)."""
    triton = state.components.get("triton")
    where = None if triton is None else triton.internal.get("model_repository")
    return None if where is None else Path(where)


def register_demo_models(
    state: StackState,
    timeout: float = 10.0,
    orchestrators: Sequence[str] = ("orchestrator",),
    settings: DevStackSettings | None = None,
    ready_timeout: float = 120.0,
) -> list[str]:
    """Pool `pools/local`, which the stack's orchestrators join by themselves, and each demo
    model at version 1 in PRODUCTION with all traffic, its artifact uploaded to the stack's S3.
    ``orchestrators`` names the orchestrator components, the first of which describes a model
    that is not uploaded. Returns once every demo version is ready on the pool (within
    ``ready_timeout`` seconds). Safe to run again on a registry that has them."""
    settings = settings or DevStackSettings()
    repository = _demo_repository(state)
    endpoints = state.endpoints()
    s3 = endpoints.get("s3")
    uploads = (
        s3_client(s3.url or f"http://{s3.address}", settings.s3_access_key, settings.s3_secret_key)
        if s3 is not None
        else None
    )
    addresses = state.addresses()
    with (
        grpc.insecure_channel(addresses["registry"]) as registry_channel,
        grpc.insecure_channel(addresses[endpoint_key(orchestrators[0])]) as orchestrator_channel,
    ):
        registry = registry_grpc.RegistryServiceStub(admin_channel(registry_channel, SYSTEM_TENANT))
        orchestrator = inference_grpc.InferenceServiceStub(orchestrator_channel)
        pool = f"pools/{LOCAL_POOL}"
        # No endpoints by hand: the orchestrators join the pool themselves. The pool outlives
        # `dev down` in PostgreSQL, so endpoints an older stack set by hand are cleared.
        local_pool = registry_pb.Pool(name=pool, endpoints=[])
        try:
            registry.CreatePool(registry_pb.CreatePoolRequest(pool=local_pool), timeout=timeout)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            registry.UpdatePool(
                registry_pb.UpdatePoolRequest(
                    pool=local_pool, update_mask=field_mask_pb2.FieldMask(paths=["endpoints"])
                ),
                timeout=timeout,
            )
        for model in ROUTED_DEMO_MODELS:
            name = f"models/{model}"
            _create(
                registry.CreateModel,
                registry_pb.CreateModelRequest(
                    model=registry_pb.Model(name=name, description=f"demo model {model}")
                ),
                timeout,
            )
            directory = None if repository is None else repository / model
            if uploads is not None and directory is not None and (directory / "config.pbtxt").is_file():
                artifact = ModelDirectory.read(directory)
                version = version_from_config(artifact.config_text)
                version.artifact_uri = artifact.upload(uploads, model)
            else:
                # No S3, or a repository of the user's own: the model is in the Triton's repository.
                metadata = orchestrator.GetModelMetadata(
                    inference_pb.GetModelMetadataRequest(model_name=model), timeout=timeout
                )
                version = registry_pb.ModelVersion(
                    platform=metadata.platform,
                    inputs=metadata.inputs,
                    outputs=metadata.outputs,
                    max_batch_size=metadata.max_batch_size,
                    artifact_uri=f"file://demo-models/{model}/{DEMO_VERSION}",
                )
            _create(
                registry.CreateModelVersion,
                registry_pb.CreateModelVersionRequest(
                    parent=name, model_version_id=DEMO_VERSION, model_version=version
                ),
                timeout,
            )
            version_name = f"{name}/versions/{DEMO_VERSION}"
            current = registry.GetModelVersion(
                registry_pb.GetModelVersionRequest(name=version_name), timeout=timeout
            ).model_version
            for stage in (registry_pb.STAGE_STAGING, registry_pb.STAGE_PRODUCTION):
                if current.stage < stage:
                    registry.TransitionModelVersionStage(
                        registry_pb.TransitionModelVersionStageRequest(name=version_name, stage=stage),
                        timeout=timeout,
                    )
            _create(
                registry.CreateDeployment,
                registry_pb.CreateDeploymentRequest(
                    parent=name,
                    deployment_id=DEMO_DEPLOYMENT,
                    deployment=registry_pb.Deployment(
                        pool=pool,
                        traffic=[registry_pb.TrafficSplit(version=DEMO_VERSION, weight=100)],
                        aliases={"production": DEMO_VERSION},
                    ),
                ),
                timeout,
            )
        # Orchestrators that fetch artifacts report readiness: wait for their word, not its absence.
        wait_until_ready(registry_channel, ROUTED_DEMO_MODELS, ready_timeout, reported=uploads is not None)
    return list(ROUTED_DEMO_MODELS)


def wait_until_ready(
    channel: grpc.Channel, models: Iterable[str], timeout: float, *, reported: bool = True
) -> None:
    """Follow the registry's routes until every version of `models` is READY (or, unless
    `reported`, on a pool that reports no readiness); DevStackError when one FAILED or time runs
    out."""
    waiting = set(models)
    routes: dict[str, registry_pb.Route] = {}
    watch = registry_grpc.RegistryServiceStub(channel).WatchRoutes(
        registry_pb.WatchRoutesRequest(models=sorted(waiting)), timeout=timeout
    )
    started = time.monotonic()
    try:
        for update in watch:
            if update.snapshot:
                routes.clear()
            routes.update((route.model, route) for route in update.routes)
            for route in routes.values():
                for version in route.versions:
                    if version.state == registry_pb.MODEL_VERSION_STATE_FAILED:
                        reasons = "; ".join(t.reason for t in version.readiness.tritons if t.reason)
                        raise DevStackError(
                            "registry",
                            f"model {route.model} version {version.version} failed: {reasons}",
                            "see the orchestrator's log in .tensorway/",
                        )
            if all(model in routes and _ready(routes[model], reported) for model in waiting):
                return
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        watch.cancel()
    pending = sorted(model for model in waiting if model not in routes or not _ready(routes[model], reported))
    raise DevStackError(
        "registry",
        f"demo models {', '.join(pending)} not ready after {time.monotonic() - started:.0f}s",
        "see the orchestrator's log in .tensorway/",
    )


def _ready(route: registry_pb.Route, reported: bool) -> bool:
    routable = {registry_pb.MODEL_VERSION_STATE_READY}
    if not reported:
        routable.add(registry_pb.MODEL_VERSION_STATE_UNSPECIFIED)
    return all(version.state in routable for version in route.versions)


def demo_request(router_address: str, timeout: float = 10.0) -> tuple[list[int], list[int]]:
    """`simple` through the router with INPUT0 = 0..15 and INPUT1 = 1: its sums and differences."""
    first = np.arange(16, dtype=np.int32).reshape(1, 16)
    second = np.ones((1, 16), dtype=np.int32)
    request = inference_pb.InferRequest(
        model_name="simple",
        inputs=[
            tensor_pb2.Tensor(name="INPUT0", datatype="INT32", shape=[1, 16], raw_contents=first.tobytes()),
            tensor_pb2.Tensor(name="INPUT1", datatype="INT32", shape=[1, 16], raw_contents=second.tobytes()),
        ],
    )
    with grpc.insecure_channel(router_address) as channel:
        response = inference_grpc.InferenceServiceStub(channel).Infer(request, timeout=timeout)
    outputs = {}
    for tensor in response.outputs:
        if tensor.raw_contents:
            outputs[tensor.name] = np.frombuffer(tensor.raw_contents, dtype=np.int32).tolist()
        else:
            outputs[tensor.name] = list(tensor.contents.int_contents)
    return outputs["OUTPUT0"], outputs["OUTPUT1"]
