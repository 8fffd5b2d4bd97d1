"""The chaos topology, started with its load: what the chaos suite and the soak bench both run.

One topology: PostgreSQL, Redis, Kafka (Tansu) and S3 once each; two Tritons; the registry; two
orchestrators, each in front of both Tritons, forming the pool `pools/local`; two routers, both
behind Envoy, sharing the global limits through Redis; the batch API and two batch workers
inferring through both routers. All are real processes on loopback, started by the devstack
launcher with every service's shipped defaults (docs/reliability.md says which ones the faults
rely on and what they cost); nothing here tunes them.

The real-time load is half the capacity `bench/edge_bench.py` measured for one router behind
Envoy on this machine kind (docs/benchmarks.md, "The edge": Envoy gRPC, `simple`, 552 req/s at
64 in flight), rounded down to 250 req/s: the suite runs the rest of the mesh and a batch job on
the same two cores, and its load generator too.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
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
from tests.waiting import PATIENCE

from .load import BatchJobs, RealtimeLoad

TRITONS = ("triton", "triton-2")
ORCHESTRATORS = ("orchestrator", "orchestrator-2")
ROUTERS = ("router", "router-2")
WORKERS = ("batch-worker", "batch-worker-2")
REQUESTS_PER_SECOND = 250.0
REQUEST_DEADLINE = 5.0
BATCH_ROWS = 6000
BATCH_SHARD_SIZE = 100


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


@contextmanager
def running_chaos_mesh(
    state_dir: Path, rate: float = REQUESTS_PER_SECOND, batch_rows: int = BATCH_ROWS
) -> Iterator[ChaosMesh]:
    """The topology up in `state_dir`, the demo models served, `rate` real-time requests a
    second flowing through Envoy; everything stopped on leaving."""
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
        # Each setup call may take as long as any awaited event: a loaded machine slows it, no more.
        register_demo_models(state, timeout=PATIENCE, orchestrators=ORCHESTRATORS)
        _wait_until_served(state)
        collect_probe_leftovers()
        settings = stack.settings
        s3 = Minio(
            state.addresses()["s3"],
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=False,
        )
        batch = BatchJobs(state.addresses()["batch"], s3, batch_rows, BATCH_SHARD_SIZE)
        realtime = RealtimeLoad(
            state.addresses()["envoy"],
            local_certificates(state_dir).ca.read_bytes(),
            _token(state_dir),
            rate,
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


def chaos_state_dir() -> Path:
    """A fresh state dir that PostgreSQL (run as `nobody` under root) can reach."""
    state_dir = Path(tempfile.mkdtemp(prefix="tensorway-chaos-"))
    state_dir.chmod(0o755)
    return state_dir


def keep_logs(state_dir: Path) -> Path:
    """Copy the servers' logs out of `state_dir`, so they outlive it; returns where."""
    kept = Path(tempfile.mkdtemp(prefix="tensorway-chaos-logs-"))
    shutil.copytree(state_dir / "logs", kept, dirs_exist_ok=True)
    return kept
