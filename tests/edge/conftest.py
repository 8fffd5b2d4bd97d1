"""A private mesh behind Envoy for the edge tests: registry, orchestrator, router, batch API,
the ratelimit service with the test limits below, and Envoy, all real, on loopback."""

from __future__ import annotations

import gc
import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from tensorway.devstack import DevStackSettings, Stack, register_demo_models
from tensorway.devstack._envoy import jwt_key_dir
from tensorway.devstack._services import Ratelimit
from tensorway.devstack._stack import default_components
from tensorway.edge.config import OPENAPI_FILE, load_values
from tensorway.edge.keys import PRIVATE_KEY_FILE, mint_token
from tests.conftest import world_searchable_temp_dir

# Tenants with their own small limits; every other tenant gets the generous wildcard ones.
TEST_LIMITS = {
    "domain": "tensorway",
    "redis_failure": "open",
    "limits": [
        {"name": "tenant-requests", "match": {"tenant": "*"}, "limit": 1000, "per": "second"},
        {"name": "burst-requests", "match": {"tenant": "burst"}, "limit": 3, "per": "second"},
        {"name": "grpc-burst-requests", "match": {"tenant": "grpc-burst"}, "limit": 2, "per": "second"},
        {"name": "tenant-rows", "match": {"tenant": "*"}, "cost": "rows", "limit": 10, "per": "minute"},
        {"name": "model-requests", "match": {"model": "*"}, "limit": 1000, "per": "second"},
        {"name": "iris-requests", "match": {"model": "iris"}, "limit": 2, "per": "minute"},
    ],
}


@dataclass(frozen=True)
class Edge:
    """The running mesh as the tests see it."""

    url: str
    """Envoy's public listener, http://host:port."""
    address: str
    """The same, host:port, for gRPC."""
    router: str
    access_log: Path
    openapi: Path
    private_key: Path
    """The stack's signing key."""
    http: requests.Session
    token: Callable[..., str]
    """A token for a tenant, signed with the stack's key: token("acme")."""

    def headers(self, tenant: str = "acme", **extra: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(tenant)}", **extra}


@pytest.fixture(scope="session")
def edge() -> Iterator[Edge]:
    state_dir = world_searchable_temp_dir("tensorway-test-edge-")
    limits = state_dir / "limits.json"  # JSON is YAML, and the service reads YAML
    limits.write_text(json.dumps(TEST_LIMITS))
    components = [
        Ratelimit(limits) if component.name == "ratelimit" else component
        for component in default_components()
    ]
    stack = Stack(
        DevStackSettings(state_dir=state_dir).without_pinned_ports(),
        state_dir=state_dir,
        components=components,
        die_with_parent=True,
    )
    http = requests.Session()
    try:
        state = stack.up(["router", "batch", "envoy"])
        register_demo_models(state)
        # The launcher's readiness probes can leave a failed connection to the garbage
        # collector; collected here, its ResourceWarning does not fail whichever test runs next.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()

        jwt = load_values("local")["jwt"]
        key = jwt_key_dir(state_dir) / PRIVATE_KEY_FILE

        def token(tenant: str, ttl: timedelta = timedelta(minutes=10)) -> str:
            return mint_token(key, tenant=tenant, issuer=jwt["issuer"], audience=jwt["audiences"][0], ttl=ttl)

        envoy = state.components["envoy"]
        url = envoy.endpoints["envoy"].url
        assert url is not None
        yield Edge(
            url=url,
            address=envoy.endpoints["envoy"].address,
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
