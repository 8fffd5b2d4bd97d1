"""Ports for the stack's servers come from below the kernel's ephemeral range, where no outgoing
connection can take one between its choosing and its server binding it."""

from __future__ import annotations

import socket

from tensorway.devstack._ports import EPHEMERAL_RANGE_FILE, PortAllocator, listening_ports, port_is_free


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    ephemeral_low = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    allocator = PortAllocator()
    ports = [allocator.free() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port < ephemeral_low for port in ports), ports
    assert all(port in listening_ports() for port in ports)
    for port in ports[:20]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", port))


def test_a_port_some_server_holds_is_never_handed_out() -> None:
    candidates = listening_ports()[:60]
    allocator = PortAllocator(candidates)
    held = []
    try:
        for port in candidates[:50]:
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                server.bind(("127.0.0.1", port))
            except OSError:
                server.close()
                continue
            server.listen()
            held.append(server)
        taken = {server.getsockname()[1] for server in held}
        # Servers this test run started earlier may hold some of the candidates too: only the
        # ports free now can be handed out, and the allocator must find exactly those.
        free_now = {port for port in candidates if port_is_free(port)}
        given = {allocator.free() for _ in range(len(free_now))}
        assert given == free_now
        assert not given & taken
    finally:
        for server in held:
            server.close()
