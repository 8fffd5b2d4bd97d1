"""The chaos suite's mesh: every part redundant that can be, under steady load, and its report.

One topology serves the whole suite: PostgreSQL, Redis, Kafka (Tansu) and S3 once each; two
Tritons; the registry; two orchestrators, each in front of both Tritons, forming the pool
`pools/local`; two routers, both behind Envoy, sharing the global limits through Redis; the
batch API and two batch workers inferring through both routers. All are real processes on
loopback, started by the devstack launcher; the tests kill and restart them one at a time.

Every service runs with its shipped defaults (docs/reliability.md says which ones the faults
rely on and what they cost); nothing here tunes them.

When TENSORWAY_CHAOS_RESULTS names a file, the fault table is written there as JSON; it is
printed at the end of the session either way.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from minio import Minio

from tensorway.devstack import (
    Component,
    DevStackSettings,
    Stack,
    StackState,
    demo_request,
    register_demo_models,
)
from tensorway.devstack._envoy import Envoy, jwt_key_dir, local_certificates
from tensorway.devstack._kafka import Kafka
from tensorway.devstack._postgres import Postgres
from tensorway.devstack._redis import Redis
from tensorway.devstack._s3 import S3
from tensorway.devstack._services import Batch, BatchWorker, Orchestrator, Registry, Router
from tensorway.devstack._triton import Triton
from tensorway.edge.config import load_values
from tensorway.edge.keys import PRIVATE_KEY_FILE, mint_token

from .load import BatchJobs, RealtimeLoad

TRITONS = ("triton", "triton-2")
ORCHESTRATORS = ("orchestrator", "orchestrator-2")
ROUTERS = ("router", "router-2")
WORKERS = ("batch-worker", "batch-worker-2")
REQUESTS_PER_SECOND = 100.0
REQUEST_DEADLINE = 5.0
BATCH_ROWS = 6000
BATCH_SHARD_SIZE = 100
RESULTS_ENV = "TENSORWAY_CHAOS_RESULTS"
RESULTS_KEY = pytest.StashKey[list[dict[str, Any]]]()
LOGS_KEY = pytest.StashKey[Path]()


def chaos_components() -> list[Component]:
    """The redundant topology, in start order."""
    return [
        Postgres(),
        Redis(),
        Kafka(),
        S3(),
        *(Triton(name=name) for name in TRITONS),
        Registry(),
        *(Orchestrator(name, tritons=TRITONS) for name in ORCHESTRATORS),
        *(Router(name) for name in ROUTERS),
        Batch(),
        *(BatchWorker(name, routers=ROUTERS) for name in WORKERS),
        Envoy(routers=ROUTERS),
    ]


@dataclass
class ChaosMesh:
    """The running topology, its load, and the levers the faults pull."""

    stack: Stack
    state: StackState
    realtime: RealtimeLoad
    batch: BatchJobs

    def address(self, endpoint: str) -> str:
        return self.state.addresses()[endpoint]


def collect_probe_leftovers() -> None:
    """The launcher's readiness probes can leave a failed connection to the garbage collector;
    collected here, after a start, its ResourceWarning does not fail whichever test runs next."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _token(state_dir: Path) -> str:
    jwt = load_values("local")["jwt"]
    return mint_token(
        jwt_key_dir(state_dir) / PRIVATE_KEY_FILE,
        tenant="chaos",
        issuer=jwt["issuer"],
        audience=jwt["audiences"][0],
    )


def _wait_until_served(state: StackState, timeout: float = 30.0) -> None:
    """Both routers answer `simple` (their route tables have it)."""
    deadline = time.monotonic() + timeout
    for router in ROUTERS:
        while True:
            try:
                demo_request(state.addresses()[router.replace("-", "_")], timeout=2)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


# Package scope: the mesh stops once the last chaos test ran, not at the end of a whole `make test`.
@pytest.fixture(scope="package")
def chaos_mesh(request: pytest.FixtureRequest) -> Iterator[ChaosMesh]:
    state_dir = Path(tempfile.mkdtemp(prefix="tensorway-chaos-"))
    # PostgreSQL runs as `nobody` under root and must reach its data dir.
    state_dir.chmod(0o755)
    stack = Stack(
        DevStackSettings(state_dir=state_dir).without_pinned_ports(),
        state_dir=state_dir,
        components=chaos_components(),
        die_with_parent=True,
    )
    realtime: RealtimeLoad | None = None
    batch: BatchJobs | None = None
    try:
        state = stack.up()
        register_demo_models(state, orchestrators=ORCHESTRATORS)
        _wait_until_served(state)
        collect_probe_leftovers()
        settings = stack.settings
        s3 = Minio(
            state.addresses()["s3"],
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=False,
        )
        batch = BatchJobs(state.addresses()["batch"], s3, BATCH_ROWS, BATCH_SHARD_SIZE)
        realtime = RealtimeLoad(
            state.addresses()["envoy"],
            local_certificates(state_dir).ca.read_bytes(),
            _token(state_dir),
            REQUESTS_PER_SECOND,
            REQUEST_DEADLINE,
        )
        realtime.start()
        yield ChaosMesh(stack, state, realtime, batch)
    finally:
        if realtime is not None:
            realtime.stop()
        if batch is not None:
            batch.close()
        stack.down()
        if request.session.testsfailed:
            # The servers' logs say what went wrong; they outlive the state dir.
            kept = Path(tempfile.mkdtemp(prefix="tensorway-chaos-logs-"))
            shutil.copytree(state_dir / "logs", kept, dirs_exist_ok=True)
            request.config.stash[LOGS_KEY] = kept
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def chaos_results(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """The fault table, one row a fault, reported at the end of the session."""
    return request.config.stash.setdefault(RESULTS_KEY, [])


_COLUMNS = (
    ("fault", "{}"),
    ("requests", "{}"),
    ("failed", "{}"),
    ("failed_pct", "{:.3f}"),
    ("p50_ms", "{:.1f}"),
    ("p99_ms", "{:.1f}"),
    ("recovery_s", "{:.2f}"),
    ("batch_rows", "{}"),
    ("rows_lost", "{}"),
    ("rows_duplicated", "{}"),
)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    logs = config.stash.get(LOGS_KEY, None)
    if logs is not None:
        terminalreporter.write_line(f"chaos: a test failed; the servers' logs are in {logs}")
    results = config.stash.get(RESULTS_KEY, [])
    if not results:
        return
    path = os.environ.get(RESULTS_ENV)
    if path:
        Path(path).write_text(json.dumps({"faults": results}, indent=2) + "\n")
    rows = [
        [("-" if row[key] is None else form.format(row[key])) for key, form in _COLUMNS] for row in results
    ]
    widths = [max(len(key), *(len(row[i]) for row in rows)) for i, (key, _) in enumerate(_COLUMNS)]
    terminalreporter.section("chaos: faults under load")
    terminalreporter.write_line("  ".join(key.ljust(w) for (key, _), w in zip(_COLUMNS, widths, strict=True)))
    for row in rows:
        terminalreporter.write_line("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for result in results:
        if result["note"]:
            terminalreporter.write_line(f"{result['fault']}: {result['note']}")
    if path:
        terminalreporter.write_line(f"written to {path}")
