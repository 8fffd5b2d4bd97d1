"""The Envoy config each profile renders to is one Envoy accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tensorway.devstack import DevStackError, render_envoy_config
from tensorway.devstack._envoy import ENVOY_BINARY
from tensorway.edge.config import profiles, render_profile


@pytest.mark.parametrize("profile", profiles())
def test_profile_renders_a_config_envoy_validates(profile: str, tmp_path: Path) -> None:
    # Deployed profiles read their files, keys and certificates from mounts; here they are where
    # render_profile wrote them.
    config = render_profile(
        profile,
        tmp_path,
        {
            "files": {"dir": str(tmp_path)},
            "jwt": {"jwks_file": "jwks.json"},
            "tls": {"cert_file": "server.crt", "key_file": "server.key"},
        },
    )
    validated = subprocess.run(
        [str(ENVOY_BINARY.locate("envoy")), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_overrides_replace_values_and_the_admin_stays_on_loopback() -> None:
    rendered = yaml.safe_load(
        render_envoy_config(
            "local", {"admin": {"port": 19901}, "router": {"host": "router.local", "port": 7}}
        )
    )
    admin = rendered["admin"]["address"]["socket_address"]
    assert admin == {"address": "127.0.0.1", "port_value": 19901}
    router = rendered["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    assert router["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "router.local",
        "port_value": 7,
    }


def test_an_unknown_profile_is_a_clear_error() -> None:
    with pytest.raises(DevStackError, match="no values file for the profile 'moon'"):
        render_envoy_config("moon")
