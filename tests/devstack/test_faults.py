"""Faults a test injects into a stack: a component killed where it stands, stalled and resumed,
then restarted where its peers look for it."""

from __future__ import annotations

import glob
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import tritonclient.grpc as grpcclient
import yaml

from tensorway.devstack import DevStackError, DevStackSettings, Stack, render_envoy_config
from tensorway.devstack._redis import Redis
from tensorway.devstack._services import Orchestrator
from tensorway.devstack._triton import Triton

from .test_triton_repository import write_echo_repository


def _ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def test_a_killed_component_restarts_on_its_ports(settings: DevStackSettings) -> None:
    stack = Stack(settings, components=[Redis()])
    try:
        before = stack.up().components["redis"]
        url = before.endpoints["redis"].url
        assert url is not None
        assert _ping(url)

        stack.kill("redis", signal.SIGSTOP)
        assert not _ping(url)
        stack.kill("redis", signal.SIGCONT)
        assert _ping(url)

        stack.kill("redis")
        assert not _ping(url)
        assert stack.status().components == {}

        after = stack.restart("redis")
        assert after.pid != before.pid
        assert after.ports == before.ports
        assert after.endpoints == before.endpoints
        assert _ping(url)
    finally:
        stack.down()


def test_faults_need_a_component_the_stack_started(settings: DevStackSettings) -> None:
    stack = Stack(settings, components=[Redis()])
    with pytest.raises(DevStackError, match="was not started"):
        stack.kill("redis")
    with pytest.raises(DevStackError, match="was not started"):
        stack.restart("redis")


def test_replicas_are_named_and_wired_to_the_peers_given() -> None:
    replica = Triton(name="triton-2")
    assert (replica.name, replica.port_settings) == ("triton-2", ())
    assert Triton().port_settings == ("triton_grpc_port", "triton_http_port")
    orchestrator = Orchestrator("orchestrator-2", tritons=("triton", "triton-2"))
    assert orchestrator.name == "orchestrator-2"
    assert orchestrator.requires == ("triton", "triton-2", "registry", "s3")


def test_envoy_balances_over_every_router_replica() -> None:
    routers = [{"host": "127.0.0.1", "port": 50061}, {"host": "127.0.0.1", "port": 50062}]
    config = yaml.safe_load(render_envoy_config("local", {"router": {"endpoints": routers}}))
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "router"]
    members = [
        endpoint["endpoint"]["address"]["socket_address"]["port_value"]
        for locality in cluster["load_assignment"]["endpoints"]
        for endpoint in locality["lb_endpoints"]
    ]
    assert members == [50061, 50062]


def _state_of(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _settled_state_of(pid: int, expected: str, timeout: float = 5.0) -> str:
    """The process's state once it is `expected`, or as it is after `timeout`: a signal takes
    effect only when the kernel next schedules every thread of the process."""
    deadline = time.monotonic() + timeout
    while (state := _state_of(pid)) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return state


def _children_of(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def _echo(address: str) -> list[float]:
    with grpcclient.InferenceServerClient(address) as client:
        tensor = grpcclient.InferInput("INPUT0", [2], "FP32")
        tensor.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
        return client.infer("echo", [tensor], client_timeout=10).as_numpy("OUTPUT0").tolist()


def test_triton_replicas_stall_and_restart_apart(settings: DevStackSettings, tmp_path: Path) -> None:
    repository = write_echo_repository(tmp_path / "models")
    stack = Stack(
        settings.model_copy(update={"triton_model_repository": repository}),
        components=[Triton(), Triton(name="triton-2")],
    )
    try:
        state = stack.up()
        first, second = state.components["triton"], state.components["triton-2"]
        address = state.endpoints()["triton_grpc"].address
        assert set(first.cleanup).isdisjoint(second.cleanup), "each replica its own shared memory"

        # A stalled server: its Python backend stubs run on.
        stack.kill("triton", signal.SIGSTOP, server_only=True)
        stubs = _children_of(first.pid)
        assert stubs
        assert _settled_state_of(first.pid, "T") == "T"
        assert all(_state_of(stub) != "T" for stub in stubs)
        stack.kill("triton", signal.SIGCONT, server_only=True)
        assert _echo(address) == [1.0, 2.0]

        # A replica killed and restarted clears its own regions, not those the other one uses.
        stack.kill("triton-2")
        stack.restart("triton-2")
        assert any(glob.glob(pattern) for pattern in first.cleanup)
        assert _echo(address) == [1.0, 2.0]
        assert _echo(state.endpoints()["triton_2_grpc"].address) == [1.0, 2.0]
    finally:
        stack.down()
