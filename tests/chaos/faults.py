"""The faults the chaos suite and the soak bench inject, one at a time, into the running chaos
mesh, and how each is measured.

A fault's window runs from its injection until the next fault's injection; the last fault's
until the mesh is steady again after it. Every real-time request that ended inside a window
counts for that fault (by its end, so a request in flight when a fault strikes counts for the
fault that hit it), in three phases: `down` (from the fault until it is healed: the component
restarted, resumed, or its model loaded again), `recovering` (until two seconds of requests in a
row all succeeded) and `after` (until the next fault). Each phase has its own p99.

The recovery time is the later of: the end of the last failed request, and the moment batch
progress resumed after its last stall of more than a second that began in the window; 0 when
requests never failed and the job never stalled, as when a replica's peers take its work at once.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import tritonclient.grpc as triton_grpc

from tensorway.batch.v1 import batch_service_pb2 as batch_pb

from .load import JobOutcome, ProgressSampler, Sample, percentile
from .mesh import WORKERS, ChaosMesh, collect_probe_leftovers

# Batch progress that stops for longer than this counts as stalled.
STALL_SECONDS = 1.0
# The mesh is steady once this long of requests, all started after the fault was healed, succeeded.
STEADY_SECONDS = 2.0
# Phases of a fault's window, in order.
PHASES = ("down", "recovering", "after")


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


def _wait_steady(mesh: ChaosMesh, after: float, timeout: float = 60.0) -> float:
    """Until STEADY_SECONDS of requests started after `after` all succeeded; returns when."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        recent = mesh.realtime.samples(max(after, now - STEADY_SECONDS), now)
        if now - after >= STEADY_SECONDS and recent and all(sample.ok for sample in recent):
            return now
        if now > deadline:
            failed = [s for s in recent if not s.ok]
            raise AssertionError(f"the mesh is not steady within {timeout:g}s: {failed[:3]}")
        time.sleep(0.2)


def _wait_for_progress(mesh: ChaosMesh, job: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not mesh.batch.rows_finished(job):
        if time.monotonic() > deadline:
            raise AssertionError(f"{job} made no progress within {timeout:g}s")
        time.sleep(0.05)


def _not_running(mesh: ChaosMesh) -> list[str]:
    return sorted(set(mesh.state.components) - set(mesh.stack.status().components))


@dataclass
class FaultWindow:
    """One fault's window as far as it has run, and its row of the fault table."""

    fault: Fault
    injected: float
    healed: float
    steady: float
    progress: list[tuple[float, int]]
    outcome: JobOutcome
    dead_after: list[str]
    row: dict[str, Any] = field(default_factory=dict)

    def measure(self, samples: Sequence[Sample], until: float) -> dict[str, Any]:
        """The row over the requests that ended in [injected, until), updated in place."""
        counted = [sample for sample in samples if self.injected <= sample.ended < until]
        failed = [sample for sample in counted if not sample.ok]
        bounds = dict(
            zip(
                PHASES,
                ((self.injected, self.healed), (self.healed, self.steady), (self.steady, until)),
                strict=True,
            )
        )
        realtime_recovery = max((sample.ended for sample in failed), default=self.injected) - self.injected
        resumed = _stall_end(self.progress, self.injected, until)
        batch_recovery = 0.0 if resumed is None else resumed - self.injected
        failures = sorted({f"{sample.code.name}: {sample.details}" for sample in failed})
        note = f"{self.fault.note}; healed {self.healed - self.injected:.1f} s after the fault"
        if failures:
            note += "; failures: " + " | ".join(failures[:3])
        if self.dead_after:
            note += "; not running after it: " + ", ".join(self.dead_after)
        if self.outcome.state != batch_pb.JOB_STATE_SUCCEEDED:
            state = batch_pb.JobState.Name(self.outcome.state)
            note += f"; batch job ended {state}: {self.outcome.failure_reason}"
        self.row.update(
            {
                "fault": self.fault.label,
                "component": self.fault.component,
                "redundant": self.fault.redundant,
                "seconds": round(until - self.injected, 1),
                "requests": len(counted),
                "failed": len(failed),
                "failed_pct": round(100.0 * len(failed) / len(counted), 3) if counted else 0.0,
                "p50_ms": _p_ms(counted, 0.50),
                "p99_ms": _p_ms(counted, 0.99),
                **{
                    f"p99_{phase}_ms": _p_ms([s for s in counted if start <= s.ended < end], 0.99)
                    for phase, (start, end) in bounds.items()
                },
                "recovery_s": round(max(realtime_recovery, batch_recovery), 2),
                "batch_rows": self.outcome.rows,
                "rows_lost": self.outcome.rows_lost,
                "rows_duplicated": self.outcome.rows_duplicated,
                "batch_state": self.outcome.state,
                "dead_after": self.dead_after,
                "note": note,
            }
        )
        return self.row


def _p_ms(samples: Sequence[Sample], share: float) -> float | None:
    value = percentile([sample.seconds * 1000 for sample in samples], share)
    return None if value is None else round(value, 1)


class FaultRunner:
    """Runs faults one after another on one mesh, each with a batch job of its own, and keeps
    each fault's window open until the next fault starts."""

    def __init__(self, mesh: ChaosMesh) -> None:
        self._mesh = mesh
        self._open: FaultWindow | None = None

    def run(self, fault: Fault) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Cause the fault under load with a batch job running, heal it, and wait until the mesh
        is steady and the job ended. Returns the fault's row (over its window so far) and the
        previous fault's row, now closed at this fault's injection (None for the first)."""
        mesh = self._mesh
        # A component an earlier fault left dead (its test failed) would skew this one.
        for name in _not_running(mesh):
            mesh.stack.restart(name)
        job = mesh.batch.submit()
        sampler = ProgressSampler(mesh.batch, job)
        sampler.start()
        healed = False
        try:
            _wait_for_progress(mesh, job)
            injected = time.monotonic()
            closed = self._close(injected)
            fault.inject(mesh)
            time.sleep(fault.down_for)
            fault.heal(mesh)
            healed = True
            healed_at = time.monotonic()
            collect_probe_leftovers()
            steady = _wait_steady(mesh, after=healed_at)
            dead_after = _not_running(mesh)
            outcome = mesh.batch.wait(job, timeout=120)
        finally:
            sampler.stop()
            if not healed:
                fault.heal(mesh)
        window = FaultWindow(fault, injected, healed_at, steady, sampler.samples, outcome, dead_after)
        self._open = window
        return window.measure(mesh.realtime.samples(0.0, time.monotonic()), time.monotonic()), closed

    def _close(self, until: float) -> dict[str, Any] | None:
        if self._open is None:
            return None
        row = self._open.measure(self._mesh.realtime.samples(0.0, until), until)
        self._open = None
        return row
