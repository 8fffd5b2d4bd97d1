"""A private mesh for the fuzz suite, every process real and on loopback: registry, orchestrator,
router (with its global limits in Redis), batch API, a batch worker and Envoy, with the demo models
registered. The fuzzers throw malformed input at it, so it is the suite's own: nothing another
test folder relies on sees the garbage.

Hypothesis' settings for the suite are in `budget.py`.
"""

from __future__ import annotations

import gc
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import requests
import urllib3
from minio import Minio

from tensorway.batch.settings import BatchSettings
from tensorway.devstack import DevStackSettings, S3Credentials, Stack, register_demo_models
from tensorway.devstack._envoy import jwt_key_dir, local_certificates
from tensorway.devstack._state import ComponentRecord
from tensorway.edge.config import OPENAPI_FILE, load_values
from tensorway.edge.keys import PRIVATE_KEY_FILE, mint_token
from tests.tempdirs import world_searchable_temp_dir
from tests.waiting import PATIENCE

BUCKET = "fuzz"
SERVICES = ("registry", "orchestrator", "router", "batch", "batch-worker", "envoy")


@dataclass(frozen=True)
class FuzzMesh:
    """The running mesh: where each service answers, and what a test needs to reach it."""

    state_dir: Path
    addresses: dict[str, str]
    """Service name → host:port (registry, router, batch, orchestrator, ...)."""
    processes: dict[str, ComponentRecord]
    """Each service's process, to tell a crash from an answer."""
    envoy_url: str
    ca: Path
    """The local CA that signed Envoy's certificate."""
    openapi: Path
    private_key: Path
    s3: Minio
    s3_credentials: S3Credentials
    kafka_bootstrap: str
    shards_topic: str
    jwt_issuer: str
    jwt_audience: str

    def channel(self, service: str) -> grpc.Channel:
        """A fresh blocking channel to `service`; the caller closes it."""
        return grpc.insecure_channel(
            self.addresses[service],
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )

    def token(self, tenant: str) -> str:
        return mint_token(
            self.private_key,
            tenant=tenant,
            issuer=self.jwt_issuer,
            audience=self.jwt_audience,
            ttl=timedelta(minutes=30),
        )

    def rest_headers(self) -> dict[str, str]:
        """Headers of a REST call through Envoy: a token for a tenant of its own, so no test's
        calls count against another's limits."""
        return {"authorization": f"Bearer {self.token(f'fuzz-{uuid.uuid4().hex[:8]}')}"}

    def dead_processes(self) -> list[str]:
        """The services whose process has exited."""
        return [name for name, record in self.processes.items() if not record.running]


@pytest.fixture(scope="session")
def fuzz_mesh() -> Iterator[FuzzMesh]:
    state_dir = world_searchable_temp_dir("tensorway-test-fuzz-")
    settings = DevStackSettings(state_dir=state_dir).without_pinned_ports()
    stack = Stack(settings, state_dir=state_dir, die_with_parent=True)
    http = urllib3.PoolManager(maxsize=4)
    try:
        state = stack.up(list(SERVICES))
        register_demo_models(state, timeout=PATIENCE)
        # The launcher's readiness probes can leave a failed connection to the garbage
        # collector; collected here, its ResourceWarning fails no test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        addresses = state.addresses()
        credentials = S3Credentials(settings.s3_access_key, settings.s3_secret_key)
        s3 = Minio(
            addresses["s3"],
            access_key=credentials.access_key,
            secret_key=credentials.secret_key,
            secure=False,
            region="us-east-1",
            http_client=http,
        )
        if not s3.bucket_exists(BUCKET):
            s3.make_bucket(BUCKET)
        jwt = load_values("local")["jwt"]
        envoy_url = state.components["envoy"].endpoints["envoy"].url
        assert envoy_url is not None
        yield FuzzMesh(
            state_dir=state_dir,
            addresses=addresses,
            processes={name: state.components[name] for name in SERVICES},
            envoy_url=envoy_url,
            ca=local_certificates(state_dir).ca,
            openapi=state_dir / "envoy" / OPENAPI_FILE,
            private_key=jwt_key_dir(state_dir) / PRIVATE_KEY_FILE,
            s3=s3,
            s3_credentials=credentials,
            kafka_bootstrap=addresses["kafka"],
            shards_topic=BatchSettings().shards_topic,
            jwt_issuer=jwt["issuer"],
            jwt_audience=jwt["audiences"][0],
        )
    finally:
        http.clear()
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def http(fuzz_mesh: FuzzMesh) -> Iterator[requests.Session]:
    """A session to Envoy that trusts the local CA (not a CA bundle the environment names)."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(fuzz_mesh.ca)
    yield session
    session.close()
