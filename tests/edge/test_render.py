"""Rendering the edge: every profile keeps admin on loopback, a remote JWKS renders a config
Envoy accepts, and the CLI writes configs and tokens."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jwt
import pytest
import yaml
from typer.testing import CliRunner

from tensorway.cli.main import app
from tensorway.devstack._envoy import ENVOY_BINARY, local_signing_key
from tensorway.edge.config import profiles, render_profile


def validate(config: Path) -> None:
    envoy = str(ENVOY_BINARY.locate("envoy"))
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", profiles())
def test_admin_stays_on_loopback(profile: str, tmp_path: Path) -> None:
    config = yaml.safe_load(render_profile(profile, tmp_path, {"files": {"dir": str(tmp_path)}}).read_text())
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


@pytest.mark.parametrize("profile", profiles())
def test_only_the_routes_rest_calls_first_match_run_the_transcoder(profile: str, tmp_path: Path) -> None:
    """gRPC calls skip it (it would only pass them through); REST calls to be transcoded match the
    catch-all route first, whose filters they keep after the transcoder re-routes them."""
    config = yaml.safe_load(render_profile(profile, tmp_path, {"files": {"dir": str(tmp_path)}}).read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    transcoding = [
        route["match"]
        for route in hcm["route_config"]["virtual_hosts"][0]["routes"]
        if "envoy.filters.http.grpc_json_transcoder" not in route.get("typed_per_filter_config", {})
    ]
    # The catch-all, and the direct answer to a method that is not public.
    assert transcoding == [
        {"prefix": "/tensorway.registry.v1.RegistryService/WatchRoutes"},
        {"prefix": "/"},
    ]


def test_a_remote_jwks_renders_a_config_envoy_accepts(tmp_path: Path) -> None:
    config = render_profile(
        "local",
        tmp_path,
        {
            "jwt": {
                "jwks_uri": "https://auth.tensorway.example/jwks.json",
                "jwks_host": "auth.tensorway.example",
                "jwks_port": 443,
            }
        },
    )
    rendered = yaml.safe_load(config.read_text())
    assert "remote_jwks" in json.dumps(rendered)
    validate(config)


def test_cli_renders_a_profile_and_mints_tokens_the_stack_accepts(tmp_path: Path) -> None:
    runner = CliRunner()
    rendered = runner.invoke(
        app, ["envoy", "render", "--profile", "compose", "--out", str(tmp_path / "compose")]
    )
    assert rendered.exit_code == 0, rendered.output
    assert {p.name for p in (tmp_path / "compose").iterdir()} >= {
        "envoy.yaml",
        "api.pb",
        "openapi.json",
        "docs",
    }
    # A deployed profile reads its JWKS from a mount, so no key is baked in beside the config.
    assert not (tmp_path / "compose" / "jwks.json").exists()
    unknown = runner.invoke(app, ["envoy", "render", "--profile", "moon", "--out", str(tmp_path / "moon")])
    assert unknown.exit_code == 2

    state_dir = tmp_path / "state"
    missing = runner.invoke(app, ["dev", "token", "--state-dir", str(state_dir)])
    assert missing.exit_code == 1
    key = local_signing_key(state_dir)
    minted = runner.invoke(app, ["dev", "token", "--state-dir", str(state_dir), "--tenant", "acme"])
    assert minted.exit_code == 0, minted.output
    public = jwt.PyJWKSet.from_dict(json.loads(key.jwks.read_text())).keys[0]
    claims = jwt.decode(minted.output.strip(), public.key, algorithms=["RS256"], audience="tensorway")
    assert claims["tenant"] == "acme"
    assert claims["iss"] == "tensorway-local"


def test_cli_makes_a_key_pair_whose_tokens_verify_against_its_jwks(tmp_path: Path) -> None:
    runner = CliRunner()
    made = runner.invoke(app, ["envoy", "keys", "--out", str(tmp_path / "keys")])
    assert made.exit_code == 0, made.output
    jwks = Path(made.output.strip())
    assert jwks == tmp_path / "keys" / "jwks.json"
    first = jwks.read_text()
    again = runner.invoke(app, ["envoy", "keys", "--out", str(tmp_path / "keys")])
    assert again.exit_code == 0
    assert jwks.read_text() == first, "an existing key pair is kept, so issued tokens stay valid"
    minted = runner.invoke(app, ["dev", "token", "--key", str(tmp_path / "keys" / "jwt-private.pem")])
    assert minted.exit_code == 0, minted.output
    public = jwt.PyJWKSet.from_dict(json.loads(jwks.read_text())).keys[0]
    claims = jwt.decode(minted.output.strip(), public.key, algorithms=["RS256"], audience="tensorway")
    assert claims["tenant"] == "default"
