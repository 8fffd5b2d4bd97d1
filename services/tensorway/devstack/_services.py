"""tensorway's own services as components of the local stack: `tensorway serve <name>`
processes wired to the servers started before them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorway.devstack._component import Component, LaunchContext, Started, loopback, venv_bin_dir
from tensorway.devstack._errors import DevStackError
from tensorway.devstack._kafka import TANSU_TOPIC_PARTITIONS
from tensorway.devstack._state import Endpoint
from tensorway.devstack._triton import model_repository_path

LOCAL_POOL = "local"
# Registry names are DNS labels, so Triton's `simple_string` stays reachable on Triton only.
ROUTED_DEMO_MODELS = ("simple", "digits", "iris", "accumulate", "tokens")


def endpoint_key(component: str) -> str:
    """The name a component's endpoint is listed under: ``router-2`` serves ``router_2``."""
    return component.replace("-", "_")


class TensorwayService(Component):
    """A tensorway service on a free port, ready once its gRPC health check says SERVING."""

    env_prefix: ClassVar[str]
    service: ClassVar[str]
    """What `tensorway serve` calls the service; the component's name by default."""
    extra_ports: ClassVar[tuple[str, ...]] = ()
    """Ports the service serves besides gRPC and metrics, each set by `<prefix><NAME>_PORT` and
    listed as the HTTP endpoint `<component>_<name>` (``router_http``)."""

    def __init__(self, name: str | None = None, settings: Mapping[str, str] | None = None) -> None:
        """``name`` makes this a replica (``router-2``); ``settings`` are the service's own
        settings by the names after its prefix (``{"BREAKER_OPEN_FOR": "0.5"}``)."""
        self.name = name or self.service
        self._settings = dict(settings or {})

    def environment(self, ctx: LaunchContext) -> dict[str, str]:
        """The service's own settings, from the endpoints of what it requires."""
        return {}

    def start(self, ctx: LaunchContext) -> Started:
        port, metrics_port = ctx.free_port(), ctx.free_port()
        extra = {name: ctx.free_port() for name in self.extra_ports}
        # Temporary files (a batch worker's faust data dir) in the component's home, so a killed
        # server leaves none of them behind in the machine's /tmp.
        temporary = ctx.home / "tmp"
        temporary.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "TMPDIR": str(temporary),
            f"{self.env_prefix}HOST": "127.0.0.1",
            f"{self.env_prefix}PORT": str(port),
            f"{self.env_prefix}METRICS_PORT": str(metrics_port),
            **{f"{self.env_prefix}{name.upper()}_PORT": str(number) for name, number in extra.items()},
            **self.environment(ctx),
            **{f"{self.env_prefix}{key}": value for key, value in self._settings.items()},
        }
        process = ctx.spawn([str(venv_bin_dir() / "tensorway"), "serve", self.service], env=env)
        address = loopback(port)
        ctx.wait_ready(process, lambda: _check_serving(address), what="grpc.health.v1 Check")
        return Started(
            process=process,
            endpoints={
                endpoint_key(self.name): Endpoint(address=address),
                **{
                    f"{endpoint_key(self.name)}_{name}": Endpoint(
                        address=loopback(extra_port), url=f"http://{loopback(extra_port)}"
                    )
                    for name, extra_port in extra.items()
                },
            },
            internal={"metrics": f"http://{loopback(metrics_port)}/metrics"},
        )


def _check_serving(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise ConnectionError(f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")


def _endpoint(ctx: LaunchContext, name: str, field: str = "address") -> str:
    endpoint = ctx.endpoints.get(name)
    if endpoint is None:
        raise DevStackError(
            ctx.name, f"needs {name}, which is not running", f"start it: tensorway dev up {name}"
        )
    value = endpoint.url if field == "url" else endpoint.address
    return value or endpoint.address


class Registry(TensorwayService):
    """The model registry on PostgreSQL and Redis."""

    service = "registry"
    requires = ("postgres", "redis")
    env_prefix = "TENSORWAY_REGISTRY_"

    def environment(self, ctx: LaunchContext) -> dict[str, str]:
        return {
            "TENSORWAY_REGISTRY_POSTGRES_URL": _endpoint(ctx, "postgres", "url"),
            "TENSORWAY_REGISTRY_REDIS_URL": _endpoint(ctx, "redis", "url"),
        }


class Orchestrator(TensorwayService):
    """An orchestrator in front of the stack's Triton(s), serving the pool `pools/local`."""

    service = "orchestrator"
    env_prefix = "TENSORWAY_ORCHESTRATOR_"

    def __init__(
        self,
        name: str | None = None,
        settings: Mapping[str, str] | None = None,
        *,
        tritons: Sequence[str] = ("triton",),
    ) -> None:
        """``tritons`` names the Triton components of its pool."""
        super().__init__(name, settings)
        self._tritons = tuple(tritons)
        self.requires = (*self._tritons, "registry", "s3")

    def environment(self, ctx: LaunchContext) -> dict[str, str]:
        tritons = [_endpoint(ctx, f"{endpoint_key(triton)}_grpc") for triton in self._tritons]
        return {
            "TENSORWAY_ORCHESTRATOR_TRITONS": json.dumps(tritons),
            "TENSORWAY_ORCHESTRATOR_POOL": LOCAL_POOL,
            "TENSORWAY_ORCHESTRATOR_REGISTRY_ADDRESS": _endpoint(ctx, "registry"),
            # Kept loaded whatever the registry says, so they can be registered from their metadata.
            "TENSORWAY_ORCHESTRATOR_MODELS": json.dumps(ROUTED_DEMO_MODELS),
            # Versions with s3:// artifacts are fetched from the stack's S3 into the Tritons' repository.
            "TENSORWAY_ORCHESTRATOR_MODEL_REPOSITORIES": json.dumps(
                {
                    address: str(model_repository_path(ctx, triton))
                    for triton, address in zip(self._tritons, tritons, strict=True)
                }
            ),
            "TENSORWAY_ORCHESTRATOR_S3_ENDPOINT": _endpoint(ctx, "s3", "url"),
            "TENSORWAY_ORCHESTRATOR_S3_ACCESS_KEY": ctx.settings.s3_access_key,
            "TENSORWAY_ORCHESTRATOR_S3_SECRET_KEY": ctx.settings.s3_secret_key,
        }


class Router(TensorwayService):
    """The public inference API, routing from the registry's route table, with the global limits
    leased from Redis."""

    service = "router"
    extra_ports = ("http",)
    requires = ("registry", "redis")
    # It learns the orchestrators from the registry's routes as they register, so it starts
    # beside them rather than after Triton and its orchestrator.
    wants = ("orchestrator",)
    env_prefix = "TENSORWAY_ROUTER_"

    def __init__(
        self,
        name: str | None = None,
        settings: Mapping[str, str] | None = None,
        *,
        limits_file: Path | None = None,
    ) -> None:
        """``limits_file`` replaces the router's own limits (services/tensorway/router/limits.yaml)."""
        super().__init__(name, settings)
        self._limits_file = limits_file

    def environment(self, ctx: LaunchContext) -> dict[str, str]:
        environment = {
            "TENSORWAY_ROUTER_REGISTRY_ADDRESS": _endpoint(ctx, "registry"),
            "TENSORWAY_ROUTER_REDIS_URL": _endpoint(ctx, "redis", "url"),
        }
        if self._limits_file is not None:
            environment["TENSORWAY_ROUTER_LIMITS_FILE"] = str(self._limits_file)
        return environment


def _batch_environment(ctx: LaunchContext, prefix: str) -> dict[str, str]:
    """What the batch API and its workers share: PostgreSQL, Kafka and S3."""
    return {
        f"{prefix}POSTGRES_URL": _endpoint(ctx, "postgres", "url"),
        f"{prefix}KAFKA_BOOTSTRAP": _endpoint(ctx, "kafka"),
        f"{prefix}SHARDS_TOPIC_PARTITIONS": str(TANSU_TOPIC_PARTITIONS),
        f"{prefix}S3_ENDPOINT": _endpoint(ctx, "s3", "url"),
        f"{prefix}S3_ACCESS_KEY": ctx.settings.s3_access_key,
        f"{prefix}S3_SECRET_KEY": ctx.settings.s3_secret_key,
    }


class Batch(TensorwayService):
    """The batch jobs API; it also shards jobs and relays them to Kafka."""

    service = "batch"
    requires = ("postgres", "kafka", "s3")
    env_prefix = "TENSORWAY_BATCH_"

    def environment(self, ctx: LaunchContext) -> dict[str, str]:
        return _batch_environment(ctx, self.env_prefix)


class BatchWorker(TensorwayService):
    """One batch worker, inferring through the stack's router(s)."""

    service = "batch-worker"
    env_prefix = "TENSORWAY_BATCH_WORKER_"

    def __init__(
        self,
        name: str | None = None,
        settings: Mapping[str, str] | None = None,
        *,
        routers: Sequence[str] = ("router",),
    ) -> None:
        """``routers`` names the router components it infers through."""
        super().__init__(name, settings)
        self._routers = tuple(routers)
        self.requires = ("batch", *self._routers)

    def environment(self, ctx: LaunchContext) -> dict[str, str]:
        routers = [_endpoint(ctx, endpoint_key(router)) for router in self._routers]
        # Several addresses make one gRPC target whose channel moves to the next router
        # when the one it uses goes away.
        target = routers[0] if len(routers) == 1 else "ipv4:" + ",".join(routers)
        return {
            **_batch_environment(ctx, self.env_prefix),
            f"{self.env_prefix}INFERENCE_TARGET": target,
            # A group's join takes about half the session timeout (Tansu): 3 s of the worker's
            # 6 s default, each time a worker joins or leaves. A local worker is never far from
            # its broker.
            f"{self.env_prefix}KAFKA_SESSION_TIMEOUT": "PT3S",
        }
