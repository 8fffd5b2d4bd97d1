"""A free loopback port for a server a test starts itself."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now; the kernel may hand it out again once this returns, so a
    server given it should bind soon."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
