"""Loopback ports for the stack's servers."""

from __future__ import annotations

import errno
import random
import socket
import threading
from pathlib import Path

LOOPBACK = "127.0.0.1"


class PortInUseError(OSError):
    """A port a component needs is already bound by another process."""


def port_is_free(port: int) -> bool:
    """True when a server could bind ``127.0.0.1:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Servers set SO_REUSEADDR too, so a socket in TIME_WAIT is no conflict.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


# Below the kernel's ephemeral range (where it picks the local port of every outgoing
# connection and of a bind to port 0) when that range leaves room; ports above 1024 otherwise.
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10000


def listening_ports() -> range:
    """Where a server's port is chosen: below the ephemeral range, so that between choosing a
    port and the server binding it (seconds, while the server starts), no connection any process
    opens can take it as its own local port."""
    try:
        low = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(LOWEST_PORT, low) if low - LOWEST_PORT >= 4096 else range(1025, 65536)


class PortAllocator:
    """Hands out free loopback ports, never the same one twice in one launch.

    A port is chosen at random below the ephemeral range and checked free by binding it, so
    only another server choosing the same port at the same moment can take it before this
    one's server binds it; the server then fails to start and says so. Components that start
    together share one allocator from several threads.
    """

    def __init__(self, candidates: range | None = None) -> None:
        """``candidates``: where ports are chosen; `listening_ports()` unless given."""
        self._handed_out: set[int] = set()
        self._lock = threading.RLock()
        self._candidates = candidates or listening_ports()
        # Not for security: spreads the stacks of concurrent test runs over the range.
        self._random = random.Random()  # noqa: S311  # nosec B311

    def free(self) -> int:
        """A free port nobody else in this launch has been given."""
        with self._lock:
            return self._free()

    def _free(self) -> int:
        while True:
            port = self._random.choice(self._candidates)
            if port not in self._handed_out and port_is_free(port):
                self._handed_out.add(port)
                return port

    def free_with_partner(self, offset: int) -> tuple[int, int]:
        """A free port ``p`` such that ``p + offset`` is free too."""
        with self._lock:
            while True:
                port = self._free()
                partner = port + offset
                if partner <= 65535 and partner not in self._handed_out and port_is_free(partner):
                    self._handed_out.add(partner)
                    return port, partner

    def pinned(self, port: int) -> int:
        """Claim a port the user fixed; raises PortInUseError when it is taken."""
        with self._lock:
            if port in self._handed_out or not port_is_free(port):
                raise PortInUseError(errno.EADDRINUSE, f"127.0.0.1:{port} is already in use")
            self._handed_out.add(port)
            return port
