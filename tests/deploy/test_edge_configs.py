"""The Envoy configs compose and Kubernetes ship are valid for the Envoy release they run, and
the files Kubernetes needs a copy of (kustomize reads nothing outside k8s/) match their source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .manifests import COMPOSE_FILE, ROOT

ENVOY = Path(sys.executable).with_name("envoy")
CONFIGS = {"compose": ROOT / "docker" / "envoy.yaml", "k8s": ROOT / "k8s" / "base" / "config" / "envoy.yaml"}


@pytest.mark.parametrize("profile", sorted(CONFIGS))
def test_envoy_config_validates(profile: str) -> None:
    checked = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(CONFIGS[profile]), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]


@pytest.mark.parametrize("profile", sorted(CONFIGS))
def test_envoy_listens_publicly_and_keeps_admin_on_loopback(profile: str) -> None:
    config = yaml.safe_load(CONFIGS[profile].read_text())
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    listeners = config["static_resources"]["listeners"]
    assert [lis["address"]["socket_address"] for lis in listeners] == [
        {"address": "0.0.0.0", "port_value": 8080}
    ]


def test_envoy_image_is_the_release_the_configs_are_validated_with() -> None:
    version = subprocess.run(
        [str(ENVOY), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    image = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["envoy"]["image"]
    tag = image.rsplit(":", 1)[1].removeprefix("v")
    assert f"/{tag}/" in version.stdout, f"{image} vs {version.stdout.strip()}"
    k8s = (ROOT / "k8s" / "base" / "envoy.yaml").read_text()
    assert f"image: {image}" in k8s


def test_kubernetes_ratelimit_limits_are_envoys() -> None:
    source = ROOT / "envoy" / "ratelimit.yaml"
    copy = ROOT / "k8s" / "base" / "config" / "ratelimit.yaml"
    assert copy.read_text() == source.read_text(), f"copy {source} to {copy}"
