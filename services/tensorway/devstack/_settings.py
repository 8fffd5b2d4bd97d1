"""Settings of the local stack launcher and of the endpoints tests run against."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _number_as_seconds(value: object) -> object:
    # Environment variables arrive as text, and "30" reads better than "PT30S".
    if isinstance(value, str) and value.replace(".", "", 1).isdigit():
        return timedelta(seconds=float(value))
    return value


Duration = Annotated[timedelta, BeforeValidator(_number_as_seconds)]
"""A timedelta that also accepts a plain number of seconds."""


@dataclass(frozen=True)
class S3Credentials:
    """An access key and secret key pair for an S3 endpoint."""

    access_key: str
    secret_key: str


class DevStackSettings(BaseSettings):
    """How `tensorway dev` and the test fixtures start the local stack."""

    model_config = SettingsConfigDict(env_prefix="TENSORWAY_DEV_")

    state_dir: Path = Path(".tensorway")
    """Where the stack keeps its state file, logs, data and sockets."""

    start_timeout: Duration = timedelta(seconds=30)
    """How long one component may take to answer its first real request."""

    triton_start_timeout: Duration = timedelta(seconds=90)
    """How long Triton may take to come up with every model loaded."""

    stop_grace: Duration = timedelta(seconds=5)
    """How long a component gets after SIGTERM before it is killed."""

    postgres_port: int | None = None
    """Fixed PostgreSQL port; a free one is picked when unset."""

    redis_port: int | None = None
    """Fixed Redis port; a free one is picked when unset."""

    kafka_port: int | None = None
    """Fixed Kafka (Tansu) port; a free one is picked when unset."""

    s3_port: int | None = None
    """Fixed S3 (SeaweedFS) port; a free one is picked when unset."""

    triton_grpc_port: int | None = None
    """Fixed Triton gRPC port; a free one is picked when unset."""

    triton_http_port: int | None = None
    """Fixed Triton HTTP port; a free one is picked when unset."""

    envoy_port: int | None = None
    """Fixed port of Envoy's public listener; a free one is picked when unset."""

    envoy_admin_port: int | None = None
    """Fixed port of Envoy's admin interface; a free one is picked when unset."""

    postgres_os_user: str = "nobody"
    """Unprivileged OS user PostgreSQL runs as when the launcher runs as root."""

    s3_access_key: str = "tensorway"
    """Access key the local S3 accepts (handed to SeaweedFS as AWS_ACCESS_KEY_ID)."""

    # A loopback dev server's well-known default, not a secret.
    s3_secret_key: str = "tensorway-secret"  # noqa: S105
    """Secret key the local S3 accepts (handed to SeaweedFS as AWS_SECRET_ACCESS_KEY)."""

    triton_model_repository: Path | None = None
    """A ready Triton model repository to serve instead of the demo models."""

    envoy_profile: str = "local"
    """Values file under envoy/values/ the Envoy config is rendered with."""

    envoy_router_address: str = "127.0.0.1:50051"
    """host:port of the router service Envoy forwards to."""

    prometheus_port: int | None = None
    """Fixed port of the optional Prometheus (`dev up --with-prometheus`); a free one when unset."""

    prometheus_scrape_interval: Duration = timedelta(seconds=5)
    """How often the local Prometheus scrapes every service: short, so a dev sees changes at once."""

    triton_otlp_traces_url: str | None = None
    """OTLP/HTTP traces URL (e.g. http://127.0.0.1:4318/v1/traces) Triton exports OpenTelemetry
    spans to; Triton's tracing stays off when unset. Triton speaks only OTLP over HTTP."""

    triton_trace_rate: int = 0
    """With Triton tracing on, also trace one in this many requests that arrive without a trace
    context; 0 traces only the requests a traced caller sends."""

    def without_pinned_ports(self) -> DevStackSettings:
        """These settings with every port left to be picked free (for tests)."""
        return self.model_copy(
            update={name: None for name in type(self).model_fields if name.endswith("_port")}
        )


class ServiceEndpoints(BaseSettings):
    """Endpoints of already running services, for tests run against docker-compose.

    Each one that is set replaces the component the test fixtures would otherwise
    start locally.
    """

    model_config = SettingsConfigDict(env_prefix="TENSORWAY_")

    postgres_url: str | None = None
    """PostgreSQL URL, e.g. ``postgresql://postgres@127.0.0.1:5432/tensorway``."""

    redis_url: str | None = None
    """Redis URL, e.g. ``redis://127.0.0.1:6379/0``."""

    kafka_bootstrap: str | None = None
    """Kafka bootstrap servers, ``host:port[,host:port...]``."""

    s3_endpoint: str | None = None
    """S3 endpoint URL, e.g. ``http://127.0.0.1:9000``."""

    s3_access_key: str = "tensorway"
    """Access key for ``s3_endpoint``."""

    # The dev stack's well-known default, not a secret.
    s3_secret_key: str = "tensorway-secret"  # noqa: S105
    """Secret key for ``s3_endpoint``."""

    triton_grpc: str | None = None
    """Triton's gRPC address, ``host:port``."""

    envoy_url: str | None = None
    """Envoy's public listener URL, e.g. ``https://127.0.0.1:8443``."""

    envoy_ca: Path | None = None
    """The CA certificate that Envoy's certificate chains to, for ``envoy_url``."""

    kafka_session_timeout: Duration = Field(default=timedelta(seconds=6))
    """Consumer-group session timeout tests give their Kafka consumers.

    Tansu's first group join takes about half of it, so it is kept low.
    """
