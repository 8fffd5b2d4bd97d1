"""Protobuf messages ↔ registry domain objects, in one place.

Resource names ("models/digits/versions/3") exist only on the proto side; the domain holds
ids. The same conversions encode the values the Redis cache keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from tensorway.registry.domain import (
    Deployment,
    Model,
    ModelStateReport,
    ModelVersion,
    ModelVersionState,
    Pool,
    Route,
    RouteUpdate,
    Shadow,
    Stage,
    Stored,
    TrafficSplit,
    TritonModelState,
    VersionReadiness,
    VersionRoute,
)
from tensorway.registry.rollout_domain import DEFAULT_INTERVAL, DEFAULT_STEPS, Rollout, VersionTraffic
from tensorway.registry.rollout_judging import RolloutBounds
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.registry.validation import format_name, parse_name
from tensorway.runtime import FieldViolation, InvalidArgument
from tensorway.tensors.signatures import specs_from_proto, specs_to_proto

T = TypeVar("T")
M = TypeVar("M", bound=Message)

STAGE_TO_PROTO = {
    Stage.DRAFT: pb.STAGE_DRAFT,
    Stage.STAGING: pb.STAGE_STAGING,
    Stage.PRODUCTION: pb.STAGE_PRODUCTION,
    Stage.ARCHIVED: pb.STAGE_ARCHIVED,
}
STAGE_FROM_PROTO = {value: stage for stage, value in STAGE_TO_PROTO.items()}


def model_name(model: str) -> str:
    return format_name(("models",), model)


def model_version_name(model: str, version: str) -> str:
    return format_name(("models", "versions"), model, version)


def pool_name(pool: str) -> str:
    return format_name(("pools",), pool)


def deployment_name(model: str, deployment: str) -> str:
    return format_name(("models", "deployments"), model, deployment)


def stage_from_proto(stage: pb.Stage.ValueType) -> Stage | None:
    """The domain stage; None for STAGE_UNSPECIFIED (and values this build does not know)."""
    return STAGE_FROM_PROTO.get(stage)


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _datetime(message: Timestamp, present: bool, field: str) -> datetime | None:
    if not present:
        return None
    try:
        return message.ToDatetime(tzinfo=UTC)
    except ValueError as exc:  # seconds or nanos outside what a Timestamp may hold
        raise InvalidArgument(f"{field} is not a valid timestamp", [FieldViolation(field, str(exc))]) from exc


def _stored_to_proto(value: Stored) -> dict[str, Any]:
    return {
        "create_time": _timestamp(value.create_time),
        "update_time": _timestamp(value.update_time),
        "etag": value.etag,
    }


def _stored_from_proto(message: pb.Model | pb.ModelVersion | pb.Pool | pb.Deployment) -> dict[str, Any]:
    times = {
        name: _datetime(getattr(message, name), message.HasField(name), name)
        for name in ("create_time", "update_time")
    }
    return {**times, "etag": message.etag}


def model_to_proto(model: Model) -> pb.Model:
    return pb.Model(
        name=model_name(model.name),
        description=model.description,
        labels=dict(model.labels),
        **_stored_to_proto(model),
    )


def model_from_proto(message: pb.Model, field: str = "model.name") -> Model:
    (name,) = parse_name(message.name, field, "models")
    return Model(
        name=name,
        description=message.description,
        labels=dict(message.labels),
        **_stored_from_proto(message),
    )


def model_version_to_proto(version: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        name=model_version_name(version.model, version.version),
        platform=version.platform,
        inputs=specs_to_proto(version.inputs),
        outputs=specs_to_proto(version.outputs),
        max_batch_size=version.max_batch_size,
        artifact_uri=version.artifact_uri,
        stage=STAGE_TO_PROTO[version.stage],
        metrics=dict(version.metrics),
        **_stored_to_proto(version),
    )


def model_version_from_proto(message: pb.ModelVersion, model: str, version: str) -> ModelVersion:
    """The version with the given ids (from its name or its create request's parent and id)."""
    return ModelVersion(
        model=model,
        version=version,
        platform=message.platform,
        inputs=specs_from_proto(message.inputs),
        outputs=specs_from_proto(message.outputs),
        max_batch_size=message.max_batch_size,
        artifact_uri=message.artifact_uri,
        stage=stage_from_proto(message.stage) or Stage.DRAFT,
        metrics=dict(message.metrics),
        **_stored_from_proto(message),
    )


def named_model_version_from_proto(message: pb.ModelVersion) -> ModelVersion:
    """The version its own name identifies (an update's, or one the cache kept)."""
    model, version = parse_name(message.name, "model_version.name", "models", "versions")
    return model_version_from_proto(message, model, version)


def pool_to_proto(pool: Pool) -> pb.Pool:
    return pb.Pool(
        name=pool_name(pool.name),
        endpoints=list(pool.endpoints),
        **_stored_to_proto(pool),
    )


def pool_from_proto(message: pb.Pool, field: str = "pool.name") -> Pool:
    (name,) = parse_name(message.name, field, "pools")
    return Pool(
        name=name,
        endpoints=tuple(message.endpoints),
        **_stored_from_proto(message),
    )


def _shadow_to_proto(shadow: Shadow | None) -> pb.ShadowTraffic | None:
    return None if shadow is None else pb.ShadowTraffic(version=shadow.version, percent=shadow.percent)


def _shadow_from_proto(message: pb.ShadowTraffic, present: bool) -> Shadow | None:
    return Shadow(message.version, message.percent) if present else None


def deployment_to_proto(deployment: Deployment) -> pb.Deployment:
    return pb.Deployment(
        name=deployment_name(deployment.model, deployment.name),
        pool=pool_name(deployment.pool),
        traffic=[pb.TrafficSplit(version=s.version, weight=s.weight) for s in deployment.traffic],
        aliases=dict(deployment.aliases),
        shadow=_shadow_to_proto(deployment.shadow),
        **_stored_to_proto(deployment),
    )


def deployment_from_proto(message: pb.Deployment, model: str, name: str) -> Deployment:
    """The deployment with the given ids; its pool is parsed from "pools/{pool}"."""
    pool = ""
    if message.pool:
        (pool,) = parse_name(message.pool, "deployment.pool", "pools")
    return Deployment(
        model=model,
        name=name,
        pool=pool,
        traffic=tuple(TrafficSplit(s.version, s.weight) for s in message.traffic),
        aliases=dict(message.aliases),
        shadow=_shadow_from_proto(message.shadow, message.HasField("shadow")),
        **_stored_from_proto(message),
    )


def named_deployment_from_proto(message: pb.Deployment) -> Deployment:
    """The deployment its own name identifies (an update's, or one the cache kept)."""
    model, name = parse_name(message.name, "deployment.name", "models", "deployments")
    return deployment_from_proto(message, model, name)


def state_to_proto(state: ModelVersionState) -> pb.ModelVersionState.ValueType:
    return pb.ModelVersionState.Value(f"MODEL_VERSION_STATE_{state.value}")


def state_from_proto(state: pb.ModelVersionState.ValueType) -> ModelVersionState:
    return ModelVersionState(pb.ModelVersionState.Name(state).removeprefix("MODEL_VERSION_STATE_"))


def _alike(source: object, names: Iterable[str]) -> dict[str, Any]:
    """The fields `names` of `source`, for a value on the other side that names them alike and
    holds them as they are."""
    return {name: getattr(source, name) for name in names}


# The fields each pair of a domain value and its message holds alike; the others are converted.
_READINESS_FIELDS = ("version", "ready_endpoints", "required_endpoints")
_TRITON_STATE_FIELDS = ("endpoint", "triton", "reason")
_STATE_REPORT_FIELDS = ("model", "version", "triton", "reason")
_VERSION_ROUTE_FIELDS = ("version", "weight", "max_batch_size", "platform", "artifact_uri")
_TRAFFIC_FIELDS = ("model", "version", "requests", "server_errors", "shadow_matches", "shadow_mismatches")


def readiness_to_proto(readiness: VersionReadiness) -> pb.VersionReadiness:
    tritons = [
        pb.TritonModelState(
            **_alike(t, _TRITON_STATE_FIELDS),
            state=state_to_proto(t.state),
            update_time=_timestamp(t.update_time),
        )
        for t in readiness.tritons
    ]
    return pb.VersionReadiness(
        **_alike(readiness, _READINESS_FIELDS),
        pool=pool_name(readiness.pool),
        state=state_to_proto(readiness.state),
        tritons=tritons,
    )


def readiness_from_proto(message: pb.VersionReadiness) -> VersionReadiness:
    tritons = tuple(
        TritonModelState(
            **_alike(t, _TRITON_STATE_FIELDS),
            state=state_from_proto(t.state),
            update_time=t.update_time.ToDatetime(tzinfo=UTC) if t.HasField("update_time") else None,
        )
        for t in message.tritons
    )
    return VersionReadiness(
        **_alike(message, _READINESS_FIELDS),
        pool=message.pool.removeprefix("pools/"),
        state=state_from_proto(message.state),
        tritons=tritons,
    )


def state_reports_from_proto(message: pb.ReportModelStatesRequest) -> list[ModelStateReport]:
    return [
        ModelStateReport(**_alike(line, _STATE_REPORT_FIELDS), state=state_from_proto(line.state))
        for line in message.states
    ]


def route_to_proto(route: Route) -> pb.Route:
    return pb.Route(
        model=route.model,
        versions=[
            pb.VersionRoute(
                **_alike(v, _VERSION_ROUTE_FIELDS),
                pool=pool_name(v.pool),
                endpoints=list(v.endpoints),
                inputs=specs_to_proto(v.inputs),
                outputs=specs_to_proto(v.outputs),
                state=state_to_proto(v.state),
                readiness=None if v.readiness is None else readiness_to_proto(v.readiness),
            )
            for v in route.versions
        ],
        aliases=dict(route.aliases),
        shadow=_shadow_to_proto(route.shadow),
    )


def route_from_proto(message: pb.Route) -> Route:
    return Route(
        model=message.model,
        versions=tuple(
            VersionRoute(
                **_alike(v, _VERSION_ROUTE_FIELDS),
                pool=v.pool.removeprefix("pools/"),
                endpoints=tuple(v.endpoints),
                inputs=specs_from_proto(v.inputs),
                outputs=specs_from_proto(v.outputs),
                readiness=readiness_from_proto(v.readiness) if v.HasField("readiness") else None,
            )
            for v in message.versions
        ),
        aliases=dict(message.aliases),
        shadow=_shadow_from_proto(message.shadow, message.HasField("shadow")),
    )


def route_to_bytes(route: Route | None) -> bytes:
    """A route for the cache; b"" records that the model has none."""
    return b"" if route is None else route_to_proto(route).SerializeToString()


def route_from_bytes(payload: bytes) -> Route | None:
    return route_from_proto(pb.Route.FromString(payload)) if payload else None


def route_update_to_proto(update: RouteUpdate) -> pb.WatchRoutesResponse:
    return pb.WatchRoutesResponse(
        revision=update.revision,
        snapshot=update.snapshot,
        routes=[route_to_proto(route) for route in update.routes],
        removed_models=list(update.removed_models),
    )


def rollout_name(model: str, rollout_id: str) -> str:
    return format_name(("models", "rollouts"), model, rollout_id)


def rollout_to_proto(rollout: Rollout) -> pb.Rollout:
    interval = Duration()
    interval.FromTimedelta(rollout.interval)
    message = pb.Rollout(
        name=rollout_name(rollout.model, rollout.id),
        deployment=deployment_name(rollout.model, rollout.deployment),
        from_version=rollout.from_version,
        to_version=rollout.to_version,
        steps=list(rollout.steps),
        interval=interval,
        bounds=pb.RolloutBounds(**asdict(rollout.bounds)),
        state=pb.RolloutState.Value(f"ROLLOUT_STATE_{rollout.state.value}"),
        step_index=rollout.step_index,
        reason=rollout.reason,
        to_figures=pb.RolloutFigures(**rollout.to_figures.summary()),
        from_figures=pb.RolloutFigures(**rollout.from_figures.summary()),
    )
    for name, value in (
        ("create_time", rollout.create_time),
        ("step_start_time", rollout.step_start_time),
        ("end_time", rollout.end_time),
    ):
        if value is not None:
            getattr(message, name).FromDatetime(value)
    return message


def rollout_from_proto(message: pb.Rollout, model: str) -> Rollout:
    """The rollout a StartRollout asks for, with defaults where fields are unset."""
    deployment = ""
    if message.deployment:
        owner, deployment = parse_name(message.deployment, "rollout.deployment", "models", "deployments")
        if owner != model:
            raise InvalidArgument(
                "the deployment belongs to another model",
                [FieldViolation("rollout.deployment", f"of models/{model}")],
            )
    # The bounds the request sets (each is an optional field), defaults for the others.
    bounds = RolloutBounds(**{bound.name: value for bound, value in message.bounds.ListFields()})
    return Rollout(
        model=model,
        deployment=deployment,
        from_version=message.from_version,
        to_version=message.to_version,
        steps=tuple(message.steps) or DEFAULT_STEPS,
        interval=message.interval.ToTimedelta() if message.HasField("interval") else DEFAULT_INTERVAL,
        bounds=bounds,
    )


def traffic_from_proto(message: pb.ReportTrafficRequest) -> list[VersionTraffic]:
    return [
        VersionTraffic(
            **_alike(item, _TRAFFIC_FIELDS),
            latency_bounds=tuple(item.latency_bounds),
            latency_counts=tuple(item.latency_counts),
        )
        for item in message.versions
    ]


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How a domain value is kept in the cache."""

    encode: Callable[[T], bytes]
    decode: Callable[[bytes], T]


def proto_codec(to_proto: Callable[[T], Message], message: type[M], from_proto: Callable[[M], T]) -> Codec[T]:
    """The codec that keeps a value as its serialized message."""
    return Codec(
        lambda value: to_proto(value).SerializeToString(),
        lambda payload: from_proto(message.FromString(payload)),
    )


MODEL_CODEC = proto_codec(model_to_proto, pb.Model, model_from_proto)
MODEL_VERSION_CODEC = proto_codec(model_version_to_proto, pb.ModelVersion, named_model_version_from_proto)
POOL_CODEC = proto_codec(pool_to_proto, pb.Pool, pool_from_proto)
DEPLOYMENT_CODEC = proto_codec(deployment_to_proto, pb.Deployment, named_deployment_from_proto)
