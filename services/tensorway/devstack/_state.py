"""The state file: what a launch started, so later commands can find and stop it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from tensorway.devstack._errors import DevStackError
from tensorway.devstack._process import ProcessIdentity, is_alive

STATE_FILE_NAME = "stack.json"


class Endpoint(BaseModel):
    """Where clients reach one service of a component."""

    address: str
    """``host:port``."""

    url: str | None = None
    """The address as a client URL, where the service has one."""


class ComponentRecord(BaseModel):
    """One running component."""

    pid: int
    start_ticks: int
    stop_signal: int = int(signal.SIGTERM)
    log: str
    """Log file, relative to the state dir."""
    endpoints: dict[str, Endpoint]
    """Public endpoints by name: what `tensorway dev status` lists."""
    internal: dict[str, str] = Field(default_factory=dict)
    """Other addresses (admin, metrics) by name."""
    cleanup: list[str] = Field(default_factory=list)
    """Glob patterns of runtime files to remove once the component is stopped."""
    ports: list[int] = Field(default_factory=list)
    """The loopback ports the component was given, in the order it asked for them; a restart
    gets the same ones."""
    start_seconds: float | None = None
    """Seconds its start took, setup included, until it answered its first real request."""

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(pid=self.pid, start_ticks=self.start_ticks)

    @property
    def running(self) -> bool:
        return is_alive(self.identity)


class StackState(BaseModel):
    """Everything a state dir's launches have started, in start order."""

    components: dict[str, ComponentRecord] = Field(default_factory=dict)

    def endpoints(self) -> dict[str, Endpoint]:
        """Every public endpoint of every component, by endpoint name."""
        return {
            name: endpoint
            for record in self.components.values()
            for name, endpoint in record.endpoints.items()
        }

    def addresses(self) -> dict[str, str]:
        """Endpoint name → ``host:port``: the shape of ``tensorway dev status --json``."""
        return {name: endpoint.address for name, endpoint in self.endpoints().items()}


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE_NAME


def load_state(state_dir: Path) -> StackState:
    """The recorded stack, empty when nothing was started there."""
    path = state_path(state_dir)
    try:
        return StackState.model_validate_json(path.read_text())
    except FileNotFoundError:
        return StackState()
    except (ValidationError, json.JSONDecodeError) as error:
        raise DevStackError(
            "stack",
            f"the state file {path} is unreadable: {error}",
            f"stop any servers it listed by hand, then delete {path}",
        ) from error


def save_state(state_dir: Path, state: StackState) -> None:
    """Write the state file atomically, or remove it when nothing is left."""
    path = state_path(state_dir)
    if not state.components:
        path.unlink(missing_ok=True)
        return
    partial = path.with_suffix(".json.partial")
    partial.write_text(state.model_dump_json(indent=2) + "\n")
    os.replace(partial, path)
