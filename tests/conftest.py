"""Session fixtures for the real servers tests talk to.

Each endpoint fixture starts its component of the local stack on first use (through
the same launcher as `tensorway dev up`, in a temporary state dir) unless the matching
environment variable points at a running one, e.g. a docker-compose stack:
TENSORWAY_POSTGRES_URL, TENSORWAY_REDIS_URL, TENSORWAY_KAFKA_BOOTSTRAP,
TENSORWAY_S3_ENDPOINT, TENSORWAY_TRITON_GRPC, TENSORWAY_ENVOY_URL.
Everything started is stopped when the session ends.
"""

from __future__ import annotations

import shutil
import ssl
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorway.devstack import DevStackSettings, Endpoint, S3Credentials, ServiceEndpoints, Stack
from tensorway.devstack._envoy import local_certificates

# The mesh behind Envoy that tests/edge and tests/security share.
from tests.edge_mesh import edge  # noqa: F401
from tests.tempdirs import world_searchable_temp_dir

# Tests and seconds (setup, call and teardown) per folder, for the summary of a run over several.
_TESTS_BY_FOLDER: Counter[str] = Counter()
_SECONDS_BY_FOLDER: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # A folder is charged for the servers its fixtures start, as setup, and stop, as teardown.
    folder = report.nodeid.split("::")[0].rpartition("/")[0]
    _SECONDS_BY_FOLDER[folder] += report.duration
    if report.when == "setup":
        _TESTS_BY_FOLDER[folder] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if len(_TESTS_BY_FOLDER) < 2:
        return
    terminalreporter.section("time per folder")
    for folder, seconds in sorted(_SECONDS_BY_FOLDER.items()):
        terminalreporter.write_line(f"{folder}: {_TESTS_BY_FOLDER[folder]} tests, {seconds:.0f} s")
    total = sum(_SECONDS_BY_FOLDER.values())
    terminalreporter.write_line(f"total: {_TESTS_BY_FOLDER.total()} tests, {total:.0f} s")


@pytest.fixture
def private_state_dir() -> Iterator[Path]:
    """A fresh state dir for a test's own stack, removed after the test."""
    path = world_searchable_temp_dir("tensorway-test-private-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def service_endpoints() -> ServiceEndpoints:
    """Endpoints given through the environment; unset ones are started locally."""
    return ServiceEndpoints()


@pytest.fixture(scope="session")
def dev_stack() -> Iterator[Stack]:
    """The session's local stack; components start when a fixture first needs them."""
    state_dir = world_searchable_temp_dir("tensorway-test-stack-")
    # Pinned ports in the environment belong to a developer's own `tensorway dev up`.
    stack = Stack(
        DevStackSettings(state_dir=state_dir).without_pinned_ports(),
        state_dir=state_dir,
        die_with_parent=True,
    )
    try:
        yield stack
    finally:
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)


def _given_or_local(
    given: str | None, request: pytest.FixtureRequest, component: str, endpoint: str = "", *, url: bool
) -> str:
    """The address the environment gives, else that of the component started locally: the URL
    or ``host:port`` of its endpoint named ``endpoint`` (by default, the component's name)."""
    if given:
        return given
    stack: Stack = request.getfixturevalue("dev_stack")
    found: Endpoint = stack.ensure([component]).endpoints()[endpoint or component]
    value = found.url if url else found.address
    assert value is not None
    return value


@pytest.fixture(scope="session")
def postgres_url(service_endpoints: ServiceEndpoints, request: pytest.FixtureRequest) -> str:
    """``postgresql://`` URL of the ``tensorway`` database."""
    return _given_or_local(service_endpoints.postgres_url, request, "postgres", url=True)


@pytest.fixture(scope="session")
def redis_url(service_endpoints: ServiceEndpoints, request: pytest.FixtureRequest) -> str:
    """``redis://`` URL."""
    return _given_or_local(service_endpoints.redis_url, request, "redis", url=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(service_endpoints: ServiceEndpoints, request: pytest.FixtureRequest) -> str:
    """Kafka bootstrap servers, ``host:port``."""
    return _given_or_local(service_endpoints.kafka_bootstrap, request, "kafka", url=False)


@pytest.fixture(scope="session")
def kafka_session_timeout_ms(service_endpoints: ServiceEndpoints) -> int:
    """Session timeout to give Kafka consumers; a group's first join takes about half of it."""
    return int(service_endpoints.kafka_session_timeout.total_seconds() * 1000)


@pytest.fixture(scope="session")
def s3_endpoint(service_endpoints: ServiceEndpoints, request: pytest.FixtureRequest) -> str:
    """S3 endpoint URL, ``http://host:port``."""
    return _given_or_local(service_endpoints.s3_endpoint, request, "s3", url=True)


@pytest.fixture(scope="session")
def s3_credentials(service_endpoints: ServiceEndpoints, request: pytest.FixtureRequest) -> S3Credentials:
    """Access and secret key that ``s3_endpoint`` accepts."""
    if service_endpoints.s3_endpoint:
        return S3Credentials(service_endpoints.s3_access_key, service_endpoints.s3_secret_key)
    settings = request.getfixturevalue("dev_stack").settings
    return S3Credentials(settings.s3_access_key, settings.s3_secret_key)


@pytest.fixture(scope="session")
def triton_grpc(service_endpoints: ServiceEndpoints, request: pytest.FixtureRequest) -> str:
    """Triton's gRPC address, ``host:port``, serving the demo models."""
    return _given_or_local(service_endpoints.triton_grpc, request, "triton", "triton_grpc", url=False)


@pytest.fixture(scope="session")
def envoy_url(service_endpoints: ServiceEndpoints, request: pytest.FixtureRequest) -> str:
    """Envoy's public listener, ``https://host:port``."""
    return _given_or_local(service_endpoints.envoy_url, request, "envoy", url=True)


@pytest.fixture(scope="session")
def envoy_tls(service_endpoints: ServiceEndpoints, request: pytest.FixtureRequest) -> ssl.SSLContext:
    """A client TLS context that trusts Envoy's certificate: TENSORWAY_ENVOY_CA's, else the local
    stack's CA."""
    if service_endpoints.envoy_ca is not None:
        return ssl.create_default_context(cafile=service_endpoints.envoy_ca)
    stack: Stack = request.getfixturevalue("dev_stack")
    return ssl.create_default_context(cafile=local_certificates(stack.state_dir).ca)
