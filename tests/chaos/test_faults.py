"""Faults injected one at a time into the redundant mesh while real-time requests flow through
Envoy and a batch job runs, each measured and held to the done-when criteria:

- at most 0.1% of real-time requests fail while a redundant component is down, and while a
  component the real-time path must not depend on is (registry, Redis, PostgreSQL, the broker);
- no batch row is lost or duplicated, whatever failed;
- requests and batch progress flow steadily again within 10 s of the fault.

Each fault's window runs from the fault until the load has run 3 s past its healing (the
component restarted, resumed or its model loaded again). Its recovery time is the later of: the
end of the last failed request, and the moment batch progress resumed after its last stall of
more than a second that began in the window; 0 when requests never failed and the job never
stalled, as when a replica's peers take its work at once.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import tritonclient.grpc as triton_grpc

from tensorway.batch.v1 import batch_service_pb2 as batch_pb

from .conftest import REQUEST_DEADLINE, WORKERS, ChaosMesh, collect_probe_leftovers
from .load import ProgressSampler, percentile

MAX_FAILED_SHARE = 0.001
MAX_RECOVERY_SECONDS = 10.0
# Batch progress that stops for longer than this counts as stalled.
STALL_SECONDS = 1.0
# How long the load runs on after the fault is healed, inside the measured window.
OBSERVE_SECONDS = 3.0


@dataclass(frozen=True)
class Fault:
    """One fault: how it is caused, how it ends, and what it may cost."""

    label: str
    component: str
    redundant: bool
    inject: Callable[[ChaosMesh], None]
    heal: Callable[[ChaosMesh], None]
    down_for: float
    note: str


def _sigkill(name: str, component: str, redundant: bool, note: str) -> Fault:
    return Fault(
        label=f"SIGKILL {name}",
        component=component,
        redundant=redundant,
        inject=lambda mesh: mesh.stack.kill(name, signal.SIGKILL),
        heal=lambda mesh: mesh.stack.restart(name),
        down_for=2.0,
        note=note,
    )


# The server stalls, not its Python backend's stubs (see Stack.kill).
def _stall(mesh: ChaosMesh) -> None:
    mesh.stack.kill("triton-2", signal.SIGSTOP, server_only=True)


def _resume(mesh: ChaosMesh) -> None:
    mesh.stack.kill("triton-2", signal.SIGCONT, server_only=True)


class SlowTriton:
    """Triton-2 keeps answering, late: its server is stopped for `stalled` of every `period`
    seconds, so each answer waits up to `stalled` and it does a quarter of its work."""

    def __init__(self, stalled: float = 0.15, period: float = 0.2) -> None:
        self._stalled, self._period = stalled, period
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def inject(self, mesh: ChaosMesh) -> None:
        self._done.clear()
        self._thread = threading.Thread(target=self._throttle, args=(mesh,), daemon=True)
        self._thread.start()

    def heal(self, mesh: ChaosMesh) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        _resume(mesh)

    def _throttle(self, mesh: ChaosMesh) -> None:
        while not self._done.is_set():
            _stall(mesh)
            time.sleep(self._stalled)
            _resume(mesh)
            self._done.wait(self._period - self._stalled)


SLOW_TRITON = SlowTriton()


def _unload_simple(mesh: ChaosMesh) -> None:
    client = triton_grpc.InferenceServerClient(mesh.address("triton_2_grpc"))
    try:
        client.unload_model("simple")
    finally:
        client.close()


def _load_simple(mesh: ChaosMesh) -> None:
    client = triton_grpc.InferenceServerClient(mesh.address("triton_2_grpc"))
    try:
        client.load_model("simple")
    finally:
        client.close()


def _lose_the_queue(mesh: ChaosMesh) -> None:
    # Workers frozen first: the shards they had fetched but not run are then known only to a
    # consumer group the broker forgets.
    for worker in WORKERS:
        mesh.stack.kill(worker, signal.SIGSTOP)
    mesh.stack.kill("kafka", signal.SIGKILL)


def _broker_back(mesh: ChaosMesh) -> None:
    try:
        mesh.stack.restart("kafka")
    finally:
        for worker in WORKERS:
            mesh.stack.kill(worker, signal.SIGCONT)


FAULTS = [
    _sigkill("router-2", "router", True, "Envoy balances over both routers"),
    _sigkill("orchestrator-2", "orchestrator", True, "routers retry on the pool's other orchestrator"),
    _sigkill("triton-2", "triton", True, "orchestrators move requests to the other Triton"),
    Fault(
        label="SIGSTOP triton-2 3 s",
        component="triton",
        redundant=True,
        inject=_stall,
        heal=_resume,
        down_for=3.0,
        note="a stalled Triton: orchestrators hedge to the other one after 500 ms (their default)",
    ),
    Fault(
        label="slow triton-2, stalled 150 ms of every 200 ms for 4 s",
        component="triton",
        redundant=True,
        inject=SLOW_TRITON.inject,
        heal=SLOW_TRITON.heal,
        down_for=4.0,
        note="a slow Triton: orchestrators send each request to the Triton with fewer waiting",
    ),
    Fault(
        label="unload simple on triton-2",
        component="triton",
        redundant=True,
        inject=_unload_simple,
        heal=_load_simple,
        down_for=3.0,
        note="Triton answers 'unknown model': orchestrators fail over and stop choosing it",
    ),
    _sigkill("registry", "registry", False, "routers keep their last route table"),
    _sigkill("redis", "redis", False, "the routers' global limits fail open"),
    _sigkill("postgres", "postgres", False, "batch leases and completions wait for it"),
    _sigkill(
        "kafka",
        "kafka",
        False,
        "in-memory broker: topics, messages and the group lost; workers run what they fetched",
    ),
    Fault(
        label="SIGKILL kafka, workers frozen",
        component="kafka",
        redundant=False,
        inject=_lose_the_queue,
        heal=_broker_back,
        down_for=2.0,
        note="every queued shard message lost with the group: the batch API republishes them",
    ),
    _sigkill("batch-worker-2", "batch-worker", True, "its leases expire and its shards are handed out again"),
]


def _stall_end(samples: list[tuple[float, int]], since: float, until: float) -> float | None:
    """When batch progress resumed after its last stall that began in [since, until)."""
    reference, resumed = since, None
    previous = next((rows for t, rows in reversed(samples) if t < since), 0)
    for at, rows in samples:
        if at < since or rows <= previous:
            continue
        if at - reference > STALL_SECONDS and reference < until:
            resumed = at
        reference, previous = at, rows
    return resumed


def _wait_steady(mesh: ChaosMesh, timeout: float = 30.0) -> None:
    """Until the last two seconds of requests all succeeded."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        recent = mesh.realtime.samples(now - 2.5, now)
        if recent and all(sample.ok for sample in recent):
            return
        if now > deadline:
            failed = [s for s in recent if not s.ok]
            raise AssertionError(f"the mesh is not steady before the fault: {failed[:3]}")
        time.sleep(0.2)


def _wait_for_progress(mesh: ChaosMesh, job: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not mesh.batch.rows_finished(job):
        if time.monotonic() > deadline:
            raise AssertionError(f"{job} made no progress within {timeout:g}s")
        time.sleep(0.05)


def _not_running(mesh: ChaosMesh) -> list[str]:
    return sorted(set(mesh.state.components) - set(mesh.stack.status().components))


def run_fault(mesh: ChaosMesh, fault: Fault) -> dict[str, Any]:
    """Cause the fault under load with a batch job running, heal it, and measure."""
    # A component an earlier fault left dead (its test failed) would skew this one.
    for name in _not_running(mesh):
        mesh.stack.restart(name)
    _wait_steady(mesh)
    job = mesh.batch.submit()
    sampler = ProgressSampler(mesh.batch, job)
    sampler.start()
    healed = False
    try:
        _wait_for_progress(mesh, job)
        injected = time.monotonic()
        fault.inject(mesh)
        time.sleep(fault.down_for)
        fault.heal(mesh)
        healed = True
        healed_at = time.monotonic()
        collect_probe_leftovers()
        time.sleep(OBSERVE_SECONDS)
        ended = time.monotonic()
        dead_after = _not_running(mesh)
        outcome = mesh.batch.wait(job, timeout=60)
    finally:
        sampler.stop()
        if not healed:
            fault.heal(mesh)
    # Requests still in flight at the window's end have their deadline to finish.
    time.sleep(max(0.0, ended + REQUEST_DEADLINE - time.monotonic()))
    samples = mesh.realtime.samples(injected, ended)
    failed = [sample for sample in samples if not sample.ok]
    latencies = [sample.seconds * 1000 for sample in samples]
    realtime_recovery = max((sample.ended for sample in failed), default=injected) - injected
    resumed = _stall_end(sampler.samples, injected, ended)
    batch_recovery = 0.0 if resumed is None else resumed - injected
    failures = sorted({f"{sample.code.name}: {sample.details}" for sample in failed})
    note = f"{fault.note}; healed {healed_at - injected:.1f} s after the fault"
    if failures:
        note += "; failures: " + " | ".join(failures[:3])
    if dead_after:
        note += "; not running after it: " + ", ".join(dead_after)
    if outcome.state != batch_pb.JOB_STATE_SUCCEEDED:
        note += f"; batch job ended {batch_pb.JobState.Name(outcome.state)}: {outcome.failure_reason}"
    return {
        "fault": fault.label,
        "component": fault.component,
        "redundant": fault.redundant,
        "requests": len(samples),
        "failed": len(failed),
        "failed_pct": round(100.0 * len(failed) / len(samples), 3) if samples else 0.0,
        "p50_ms": _rounded(percentile(latencies, 0.50)),
        "p99_ms": _rounded(percentile(latencies, 0.99)),
        "recovery_s": round(max(realtime_recovery, batch_recovery), 2),
        "batch_rows": outcome.rows,
        "rows_lost": outcome.rows_lost,
        "rows_duplicated": outcome.rows_duplicated,
        "batch_state": outcome.state,
        "dead_after": dead_after,
        "note": note,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# The first test also starts the mesh (about a minute on a busy two-core machine), the last one
# stops it; a Triton restart alone can take twenty seconds there.
@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", FAULTS, ids=[fault.label for fault in FAULTS])
def test_the_mesh_survives(fault: Fault, chaos_mesh: ChaosMesh, chaos_results: list[dict[str, Any]]) -> None:
    result = run_fault(chaos_mesh, fault)
    batch_state = result.pop("batch_state")
    dead_after = result.pop("dead_after")
    chaos_results.append(result)

    assert dead_after == [], result["note"]
    assert result["requests"] > 0
    assert result["failed"] <= MAX_FAILED_SHARE * result["requests"], result["note"]
    assert batch_state == batch_pb.JOB_STATE_SUCCEEDED, result["note"]
    assert (result["rows_lost"], result["rows_duplicated"]) == (0, 0), result["note"]
    assert result["recovery_s"] <= MAX_RECOVERY_SECONDS, result["note"]
