"""A private mesh behind Envoy for the edge and security tests: registry, orchestrator, a router
enforcing the test limits below through Redis, batch API and Envoy, all real, on loopback.
The root conftest imports the fixture, so both folders share one mesh."""

from __future__ import annotations

import gc
import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import requests

from tensorway.devstack import DevStackSettings, Stack, register_demo_models
from tensorway.devstack._envoy import Envoy, jwt_key_dir, local_certificates
from tensorway.devstack._services import Router
from tensorway.devstack._stack import default_components
from tensorway.edge.config import OPENAPI_FILE, load_values
from tensorway.edge.keys import PRIVATE_KEY_FILE, mint_token
from tensorway.runtime.context import ADMIN_SCOPES, TENANT_SCOPES
from tests.tempdirs import world_searchable_temp_dir
from tests.waiting import PATIENCE

# The router's global limits in the tests. Tenants named here have their own small limits (a
# literal match wins over "*"), counted per hour so no window ends in the middle of a test; every
# other tenant gets the generous wildcard ones.
TEST_LIMITS = {
    "domain": "tensorway",
    "redis_failure": "open",
    "limits": [
        {"name": "tenant-requests", "match": {"tenant": "*"}, "limit": 1000, "per": "second"},
        {"name": "burst-requests", "match": {"tenant": "burst"}, "limit": 3, "per": "hour"},
        {"name": "stream-requests", "match": {"tenant": "stream-burst"}, "limit": 5, "per": "hour"},
        {"name": "tenant-rows", "match": {"tenant": "*"}, "cost": "rows", "limit": 100000, "per": "minute"},
        {"name": "rest-rows", "match": {"tenant": "rows-rest"}, "cost": "rows", "limit": 10, "per": "hour"},
        {"name": "grpc-rows", "match": {"tenant": "rows-grpc"}, "cost": "rows", "limit": 10, "per": "hour"},
        {
            "name": "tenant-bytes",
            "match": {"tenant": "*"},
            "cost": "bytes",
            "limit": 1 << 30,
            "per": "minute",
        },
        {"name": "model-requests", "match": {"model": "*"}, "limit": 1000, "per": "second"},
        {"name": "iris-requests", "match": {"model": "iris"}, "limit": 2, "per": "hour"},
    ],
}

# Per-tenant local limits on the batch and inference routes small enough for a test to exceed on
# purpose, and large enough for every other test's calls in the minute.
ROUTER_LOCAL_LIMIT = 100
EDGE_VALUES = {
    "batch": {"local_rate_limit": {"max_tokens": 40, "tokens_per_fill": 40, "fill_interval": "60s"}},
    "router": {
        "local_rate_limit": {
            "max_tokens": ROUTER_LOCAL_LIMIT,
            "tokens_per_fill": ROUTER_LOCAL_LIMIT,
            "fill_interval": "60s",
        }
    },
}


@dataclass(frozen=True)
class Edge:
    """The running mesh as the tests see it."""

    url: str
    """Envoy's public listener, https://host:port."""
    address: str
    """The same, host:port, for gRPC."""
    ca: Path
    """The local CA that signed Envoy's certificate."""
    router: str
    access_log: Path
    openapi: Path
    private_key: Path
    """The stack's signing key."""
    http: requests.Session
    token: Callable[..., str]
    """A token for a tenant, signed with the stack's key: token("acme"), token("ops", admin=True)."""

    def headers(self, tenant: str = "acme", *, admin: bool = False, **extra: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(tenant, admin=admin)}", **extra}

    def channel(self) -> grpc.Channel:
        """A gRPC channel to Envoy over TLS, trusting the local CA."""
        return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.ca.read_bytes()))

    def aio_channel(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.address, grpc.ssl_channel_credentials(self.ca.read_bytes()))


@pytest.fixture(scope="session")
def edge() -> Iterator[Edge]:
    state_dir = world_searchable_temp_dir("tensorway-test-edge-")
    limits = state_dir / "limits.json"  # JSON is YAML, and the router reads YAML
    limits.write_text(json.dumps(TEST_LIMITS))
    replaced = {"router": Router(limits_file=limits), "envoy": Envoy(values=EDGE_VALUES)}
    components = [replaced.get(component.name, component) for component in default_components()]
    stack = Stack(
        DevStackSettings(state_dir=state_dir).without_pinned_ports(),
        state_dir=state_dir,
        components=components,
        die_with_parent=True,
    )
    http = requests.Session()
    try:
        # A batch worker too, so a job submitted through Envoy runs to its end (tests/edge/test_cli.py).
        state = stack.up(["router", "batch", "batch-worker", "envoy"])
        register_demo_models(state, timeout=PATIENCE)
        # The launcher's readiness probes can leave a failed connection to the garbage
        # collector; collected here, its ResourceWarning does not fail whichever test runs next.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()

        jwt = load_values("local")["jwt"]
        key = jwt_key_dir(state_dir) / PRIVATE_KEY_FILE

        def token(tenant: str, ttl: timedelta = timedelta(minutes=10), *, admin: bool = False) -> str:
            return mint_token(
                key,
                tenant=tenant,
                scopes=ADMIN_SCOPES if admin else TENANT_SCOPES,
                issuer=jwt["issuer"],
                audience=jwt["audiences"][0],
                ttl=ttl,
            )

        envoy = state.components["envoy"]
        url = envoy.endpoints["envoy"].url
        assert url is not None
        ca = local_certificates(state_dir).ca
        # The local CA, not the CA bundle an environment variable may name (which requests prefers).
        http.trust_env = False
        http.verify = str(ca)
        yield Edge(
            url=url,
            address=envoy.endpoints["envoy"].address,
            ca=ca,
            router=state.addresses()["router"],
            access_log=state_dir / envoy.log,
            openapi=state_dir / "envoy" / OPENAPI_FILE,
            private_key=key,
            http=http,
            token=token,
        )
    finally:
        http.close()
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)
