"""Starting and stopping the local stack as a whole."""

from __future__ import annotations

import glob
import os
import queue
import shutil
import signal
import subprocess  # nosec B404
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorway.devstack._component import Component, LaunchContext, Spawner, port_in_use_error
from tensorway.devstack._envoy import Envoy
from tensorway.devstack._errors import DevStackError, ExitedWhileStarting
from tensorway.devstack._kafka import Kafka
from tensorway.devstack._ports import PortAllocator, port_is_free
from tensorway.devstack._postgres import Postgres
from tensorway.devstack._process import ProcessIdentity, identify, signal_server, spawn, stop_group
from tensorway.devstack._prometheus import Prometheus
from tensorway.devstack._redis import Redis
from tensorway.devstack._s3 import S3
from tensorway.devstack._services import Batch, BatchWorker, Orchestrator, Registry, Router
from tensorway.devstack._settings import DevStackSettings
from tensorway.devstack._state import ComponentRecord, Endpoint, StackState, load_state, save_state
from tensorway.devstack._triton import Triton


def default_components(*, models_from_registry: bool = False) -> list[Component]:
    """Every component of the local stack, in dependency order; optional ones come last, since they
    watch the others.

    By default Triton loads every demo model at its start and the orchestrator keeps the routed
    ones loaded whatever the registry says, so a Triton started alone serves them (as the tests
    use it). ``models_from_registry`` leaves them to the registry's deployments instead: Triton
    starts with none loaded and the orchestrator loads each deployed version once, from its
    artifact (what `tensorway dev up` does; the models loaded at start would only be loaded again).
    """
    return [
        Postgres(),
        Redis(),
        Kafka(),
        S3(),
        Triton(load_models=not models_from_registry),
        Registry(),
        Orchestrator(settings={"MODELS": "[]"} if models_from_registry else None),
        Router(),
        Batch(),
        BatchWorker(),
        Envoy(),
        Prometheus(),
    ]


COMPONENT_NAMES: tuple[str, ...] = tuple(component.name for component in default_components())


class Stack:
    """The local stack of one state dir.

    Each component starts once those it requires have answered, beside every other one that
    can start then, and is recorded in the state file as it answers; if any fails, the ones
    this call started are stopped again.
    """

    def __init__(
        self,
        settings: DevStackSettings | None = None,
        *,
        state_dir: Path | None = None,
        components: Sequence[Component] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """``die_with_parent`` ties the servers to the thread that starts them, so a
        test session killed before its teardown leaves no server behind; servers
        started by `tensorway dev up` outlive the command and so do not use it."""
        self.settings = settings or DevStackSettings()
        self.state_dir = (state_dir or self.settings.state_dir).absolute()
        self._die_with_parent = die_with_parent
        self._catalog = {component.name: component for component in components or default_components()}

    def up(
        self,
        components: Iterable[str] | None = None,
        *,
        on_started: Callable[[str, ComponentRecord], None] | None = None,
    ) -> StackState:
        """Start the named components (all but the optional ones when None) and those they require.

        ``on_started`` is called (on this thread) with each component's record as it answers.

        Raises DevStackError when one of them is already running in this state dir,
        a pinned port is taken, a binary is missing or a server fails to start.
        """
        requested = (
            list(components)
            if components is not None
            else [name for name, component in self._catalog.items() if not component.optional]
        )
        wanted = self._with_requirements(requested)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = self._drop_dead(load_state(self.state_dir))
        already = [name for name in requested if name in state.components]
        if already:
            raise DevStackError(
                "stack",
                f"already running in {self.state_dir}: "
                + ", ".join(f"{name} (pid {state.components[name].pid})" for name in already),
                f"stop it first: tensorway dev down (TENSORWAY_DEV_STATE_DIR={self.state_dir})",
            )
        # Requirements that already run are used as they are.
        to_start = [name for name in wanted if name not in state.components]
        self._check_pinned_ports(to_start)
        ports = PortAllocator()
        # The state file lists components in dependency order, whatever order they answered in.
        order = [*state.components, *to_start]
        # If any start fails, what this call started is stopped again (last first) and the
        # state file saved without it; once all have answered, they stay.
        with ExitStack() as started_now:
            started_now.callback(save_state, self.state_dir, state)

            def record(name: str, started: ComponentRecord) -> None:
                state.components[name] = started
                started_now.callback(lambda: self._stop(name, state.components.pop(name)))
                state.components = {n: state.components[n] for n in order if n in state.components}
                save_state(self.state_dir, state)
                if on_started is not None:
                    on_started(name, started)

            self._start_together(to_start, ports, state, record)
            started_now.pop_all()
        return state

    def _start_together(
        self,
        names: list[str],
        ports: PortAllocator,
        state: StackState,
        record: Callable[[str, ComponentRecord], None],
    ) -> None:
        """Start ``names``, each on a thread of its own once those it starts after have answered.

        Every server process is spawned on this thread, not on the start's, since a server tied
        to its parent dies when the thread that spawned it ends. After the first failure (or an
        interrupt) no start begins and those under way give up at their next wait; the first
        failure is raised once every start has ended, so `up` stops exactly what answered.
        """
        waits = {name: self._catalog[name].starts_after(names) for name in names}
        events: queue.SimpleQueue[Future[ComponentRecord] | _SpawnRequest] = queue.SimpleQueue()
        cancelled = threading.Event()
        spawner = _ThreadSpawner(events, cancelled)
        pending = list(names)
        running: dict[Future[ComponentRecord], str] = {}
        answered: set[str] = set()
        failure: BaseException | None = None
        with ThreadPoolExecutor(max_workers=max(1, len(names)), thread_name_prefix="devstack") as pool:
            while pending or running:
                try:
                    if failure is None:
                        for name in [name for name in pending if waits[name] <= answered]:
                            pending.remove(name)
                            future = pool.submit(
                                self._start,
                                self._catalog[name],
                                ports,
                                state.endpoints(),
                                spawner=spawner,
                                cancelled=cancelled,
                            )
                            running[future] = name
                            future.add_done_callback(events.put)
                        if pending and not running:
                            raise DevStackError("stack", "these wait for each other: " + ", ".join(pending))
                    else:
                        pending.clear()
                    event = events.get()
                    if isinstance(event, _SpawnRequest):
                        event.run(spawn, refuse=failure is not None)
                        continue
                    name = running.pop(event)
                    error = event.exception()
                    if error is not None:
                        raise error
                    answered.add(name)
                    record(name, event.result())
                except BaseException as error:
                    failure = failure or error
                    cancelled.set()
        if failure is not None:
            raise failure

    def ensure(self, components: Iterable[str]) -> StackState:
        """Start whichever of the named components is not running yet; return the stack."""
        running = self.status().components
        missing = [name for name in components if name not in running]
        return self.up(missing) if missing else self.status()

    def down(self) -> list[str]:
        """Stop every recorded component; return their names in the order stopped.

        A component stops once nothing that requires it still runs; components that
        do not depend on each other stop together, since several take seconds each.
        Only processes recorded in the state file are signalled. Data and logs stay
        in the state dir; runtime files go. Safe to call when nothing runs.
        """
        state = load_state(self.state_dir)
        stopped: list[str] = []
        while state.components:
            remaining = list(state.components)
            needed = {
                requirement
                for name in remaining
                if name in self._catalog
                for requirement in self._catalog[name].requires
            }
            batch = [name for name in reversed(remaining) if name not in needed]
            with ThreadPoolExecutor(max_workers=len(batch)) as pool:
                list(pool.map(lambda name: self._stop(name, state.components[name]), batch))
            for name in batch:
                del state.components[name]
            stopped.extend(batch)
            save_state(self.state_dir, state)
        return stopped

    def kill(self, name: str, signum: int = signal.SIGKILL, *, server_only: bool = False) -> None:
        """Send ``signum`` to a running component's process group, as a fault would: SIGKILL
        kills it where it stands (no shutdown), SIGSTOP stalls it, SIGCONT resumes it.

        ``server_only`` signals the server's own process and not the helpers it started, as when
        the server alone stalls: Triton's Python backend runs each model in a stub process, and
        a Triton 2.51 frozen together with its stubs can abort once resumed
        (`boost::interprocess::lock_exception` in the backend).

        The record stays, so `restart` can bring the component back on its ports and `down`
        still stops it.
        """
        record = self._record(name)
        try:
            signal_server(record.identity, signum, whole_group=not server_only)
        except ProcessLookupError:
            raise DevStackError(name, "is not running", f"start it: tensorway dev up {name}") from None

    def restart(self, name: str) -> ComponentRecord:
        """Stop what is left of a component (killed or not) and start it again on the same ports,
        so the peers configured with its address find it again; returns its new record."""
        record = self._record(name)
        state = load_state(self.state_dir)
        self._stop(name, record)
        state.components[name] = self._start(
            self._catalog[name], PortAllocator(), state.endpoints(), reuse_ports=record.ports
        )
        save_state(self.state_dir, state)
        return state.components[name]

    def _record(self, name: str) -> ComponentRecord:
        record = load_state(self.state_dir).components.get(name)
        if record is None:
            raise DevStackError(
                name, f"was not started in {self.state_dir}", f"start it: tensorway dev up {name}"
            )
        return record

    def status(self) -> StackState:
        """The recorded components whose servers are still running."""
        state = load_state(self.state_dir)
        return StackState(
            components={name: record for name, record in state.components.items() if record.running}
        )

    def _with_requirements(self, names: list[str]) -> list[str]:
        unknown = sorted(set(names) - set(self._catalog))
        if unknown:
            raise DevStackError(
                "stack",
                "unknown component(s): " + ", ".join(unknown),
                "choose from: " + ", ".join(self._catalog),
            )
        needed: set[str] = set()
        pending = list(names)
        while pending:
            name = pending.pop()
            if name not in needed:
                needed.add(name)
                pending.extend((*self._catalog[name].requires, *self._catalog[name].wants))
        return [name for name in self._catalog if name in needed]

    def _drop_dead(self, state: StackState) -> StackState:
        """Forget components whose server died, after stopping any leftovers of theirs."""
        for name, record in list(state.components.items()):
            if not record.running:
                self._stop(name, state.components.pop(name))
        save_state(self.state_dir, state)
        return state

    def _check_pinned_ports(self, names: list[str]) -> None:
        # Checked before anything starts, so a taken port costs no half-started stack.
        for name in names:
            for setting in self._catalog[name].port_settings:
                port: int | None = getattr(self.settings, setting)
                if port is not None and not port_is_free(port):
                    raise port_in_use_error(name, setting, port)

    def _start(
        self,
        component: Component,
        ports: PortAllocator,
        endpoints: Mapping[str, Endpoint],
        reuse_ports: Sequence[int] = (),
        *,
        spawner: Spawner = spawn,
        cancelled: threading.Event | None = None,
    ) -> ComponentRecord:
        began = time.monotonic()
        for attempt in range(1, component.start_attempts + 1):
            ctx = LaunchContext(
                component.name,
                self.state_dir,
                self.settings,
                ports,
                endpoints=endpoints,
                die_with_parent=self._die_with_parent,
                reuse_ports=reuse_ports,
                spawner=spawner,
                cancelled=cancelled,
            )
            with ExitStack() as spawned:
                # A start that fails stops every process it spawned, last first.
                spawned.callback(self._stop_spawned, ctx)
                try:
                    started = component.start(ctx)
                except ExitedWhileStarting:
                    if attempt == component.start_attempts:
                        raise
                    # Again on the ports it was given: its peers may be configured with them.
                    reuse_ports = ctx.ports
                    continue
                identity = identify(started.process.pid)
                spawned.pop_all()
                break
        return ComponentRecord(
            pid=identity.pid,
            start_ticks=identity.start_ticks,
            stop_signal=int(started.stop_signal),
            log=str(ctx.log_path.relative_to(self.state_dir)),
            endpoints=started.endpoints,
            internal=started.internal,
            cleanup=started.cleanup,
            ports=ctx.ports,
            start_seconds=round(time.monotonic() - began, 3),
        )

    def _stop_spawned(self, ctx: LaunchContext) -> None:
        grace = self.settings.stop_grace.total_seconds()
        for process in reversed(ctx.spawned):
            stop_group(_identity_of(process), grace=grace)

    def _stop(self, name: str, record: ComponentRecord) -> None:
        stop_group(
            record.identity,
            grace=self.settings.stop_grace.total_seconds(),
            stop_signal=record.stop_signal,
        )
        for pattern in record.cleanup:
            for path in glob.glob(pattern):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    Path(path).unlink(missing_ok=True)


@dataclass
class _SpawnRequest:
    """A server process a start on another thread asks the launcher's thread to spawn."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    process: subprocess.Popen[bytes] | None = None
    error: BaseException | None = None

    def run(self, spawner: Spawner, *, refuse: bool) -> None:
        try:
            if refuse:
                raise DevStackError("stack", "start cancelled: another component failed to start")
            self.process = spawner(*self.args, **self.kwargs)
        except BaseException as error:
            self.error = error
            if not isinstance(error, Exception):
                raise
        finally:
            self.done.set()


class _ThreadSpawner:
    """`spawn` for starts on other threads: the launcher's thread runs it and hands back the process."""

    def __init__(self, requests: queue.SimpleQueue[Any], cancelled: threading.Event) -> None:
        self._requests = requests
        self._cancelled = cancelled

    def __call__(self, *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        request = _SpawnRequest(args, kwargs)
        self._requests.put(request)
        # Once the launch is cancelled the launcher's thread spawns nothing more, so a request it
        # has not run (or dropped, interrupted) is given up rather than waited for.
        while not request.done.wait(0.1):
            if self._cancelled.is_set():
                raise DevStackError("stack", "start cancelled: another component failed to start")
        if request.error is not None:
            raise request.error
        if request.process is None:
            raise RuntimeError("the spawn request ended with neither a process nor an error")
        return request.process


def _identity_of(process: subprocess.Popen[bytes]) -> ProcessIdentity:
    try:
        return identify(process.pid)
    except ProcessLookupError:
        # Already gone (or a zombie awaiting its reap): nothing left to match.
        return ProcessIdentity(pid=process.pid, start_ticks=-1)


def up(
    state_dir: Path | None = None,
    components: Iterable[str] | None = None,
    settings: DevStackSettings | None = None,
) -> StackState:
    """Start components of the local stack in ``state_dir``; see Stack.up."""
    return Stack(settings, state_dir=state_dir).up(components)


def down(state_dir: Path | None = None, settings: DevStackSettings | None = None) -> list[str]:
    """Stop everything recorded in ``state_dir``; see Stack.down."""
    return Stack(settings, state_dir=state_dir).down()


def status(state_dir: Path | None = None, settings: DevStackSettings | None = None) -> StackState:
    """What runs in ``state_dir``; see Stack.status."""
    return Stack(settings, state_dir=state_dir).status()
