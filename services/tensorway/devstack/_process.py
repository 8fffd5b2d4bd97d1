"""Starting, finding and stopping the stack's server processes.

Every server runs as the leader of its own process group, so stopping the group also
stops whatever the server forked (PostgreSQL backends, Triton's Python stubs). A
process is identified by its PID plus its start time from ``/proc``, so a PID the
kernel has since handed to someone else is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess  # nosec B404
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")

# Servers this Python process started, kept until they are stopped and reaped: a
# Popen dropped while its server runs would warn, and an unreaped one stays a zombie.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ProcessIdentity:
    """A process this launcher started: its PID and kernel start time."""

    pid: int
    start_ticks: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name in parentheses may itself contain spaces or parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def identify(pid: int) -> ProcessIdentity:
    """The identity of a live process (raises ProcessLookupError when it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    return ProcessIdentity(pid=pid, start_ticks=int(fields[19]))


def is_alive(identity: ProcessIdentity) -> bool:
    """True while the process runs; a zombie or a reused PID counts as gone."""
    fields = _stat_fields(identity.pid)
    if fields is None:
        return False
    return fields[0] != "Z" and int(fields[19]) == identity.start_ticks


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    user: int | None = None,
    group: int | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a server in its own session, appending its output to ``log_path``.

    With ``die_with_parent`` the server gets SIGTERM when the thread that started it
    exits, however it exits.
    """
    with log_path.open("ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        command = list(argv)
        if die_with_parent:
            # The guard takes the server's account itself: it must arm the signal after that.
            account = ["" if user is None else str(user), "" if group is None else str(group)]
            command = [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *account, *command]
            user = group = None
        # argv comes from the launcher's own components, never from a shell string.
        process = subprocess.Popen(  # noqa: S603  # nosec B603
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=True,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
        )
    _children[process.pid] = process
    return process


# Arms the parent-death signal in a small Python that then becomes the server (same PID), rather
# than in a preexec_fn: Python code between fork and exec can crash the child when other threads
# of the parent are inside a C library (gRPC's, say) at the moment of the fork.
# A change of user clears the signal, so the guard switches to the server's account first.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
parent, user, group = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if group:
    os.setgroups([])
    os.setgid(int(group))
if user:
    os.setuid(int(user))
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG from <linux/prctl.h>
if os.getppid() != parent:
    os.kill(os.getpid(), signal.SIGTERM)  # the parent died before the signal was armed
os.execvp(sys.argv[4], sys.argv[4:])
"""


def stop_group(
    identity: ProcessIdentity,
    *,
    grace: float,
    stop_signal: int = signal.SIGTERM,
) -> None:
    """Stop a server and its process group: ``stop_signal``, then SIGKILL after ``grace``.

    A server this Python process started is reaped here; one started by an earlier
    command is reaped by whoever adopted it.
    """
    pgid = identity.pid
    if _pid_reused(identity):
        # The kernel hands a PID out again only once no process group has it as its
        # id, so our group is gone and this one belongs to someone else.
        return
    if is_alive(identity):
        _signal_group(pgid, stop_signal)
        deadline = time.monotonic() + grace
        while is_alive(identity) and time.monotonic() < deadline:
            time.sleep(0.05)
    elif not _group_members(pgid):
        reap(identity.pid)
        return
    # Whatever outlived the grace period, leader or stray child, is killed.
    if is_alive(identity) or _group_members(pgid):
        _signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while (is_alive(identity) or _group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.05)
    reap(identity.pid)


def signal_server(identity: ProcessIdentity, signum: int, *, whole_group: bool = True) -> None:
    """Send ``signum`` to a running server's process group, or to the server's own process alone
    (a fault injected on purpose: SIGKILL, SIGSTOP, SIGCONT); ProcessLookupError when the server
    is not running."""
    if not is_alive(identity):
        raise ProcessLookupError(identity.pid)
    if whole_group:
        os.killpg(identity.pid, signum)
    else:
        os.kill(identity.pid, signum)


def _pid_reused(identity: ProcessIdentity) -> bool:
    fields = _stat_fields(identity.pid)
    return fields is not None and int(fields[19]) != identity.start_ticks


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def reap(pid: int) -> None:
    """Collect the exit status of a server this process started (no-op for others)."""
    handle = _children.pop(pid, None)
    if handle is not None:
        try:
            handle.wait(timeout=5)
        except subprocess.TimeoutExpired:
            handle.kill()
            handle.wait()


def log_tail(log_path: Path, lines: int = 25) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    tail = text.rstrip().splitlines()[-lines:]
    return "\n".join(f"    | {line}" for line in tail) or "(log is empty)"
