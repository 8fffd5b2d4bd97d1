"""Loopback ports for the stack's servers."""

from __future__ import annotations

import errno
import socket
import threading

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


class PortAllocator:
    """Hands out free loopback ports, never the same one twice in one launch.

    A port is found by binding port 0 and releasing it, so another process may take
    it before the server binds it; the server then fails to start and says so. Components
    that start together share one allocator from several threads.
    """

    def __init__(self) -> None:
        self._handed_out: set[int] = set()
        self._lock = threading.RLock()

    def free(self) -> int:
        """A free port nobody else in this launch has been given."""
        with self._lock:
            return self._free()

    def _free(self) -> int:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((LOOPBACK, 0))
                port: int = probe.getsockname()[1]
            if port not in self._handed_out:
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
