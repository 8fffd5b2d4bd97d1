"""The Envoy that compose and Kubernetes run is the release CI validates the configs with, its
image carries the profile's rendered files where the config expects them, and the files
Kubernetes needs a copy of (kustomize reads nothing outside k8s/) match their source."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tensorway.edge.config import load_values

from .manifests import COMPOSE_FILE, DOCKERFILE, ROOT

ENVOY = Path(sys.executable).with_name("envoy")


def dockerfile_stage(name: str) -> str:
    text = DOCKERFILE.read_text()
    start = re.search(rf"^FROM\s+\S+\s+AS\s+{name}\s*$", text, re.MULTILINE | re.IGNORECASE)
    assert start, f"no stage {name}"
    following = re.search(r"^FROM\s", text[start.end() :], re.MULTILINE)
    return text[start.start() : start.end() + following.start() if following else len(text)]


def test_envoy_image_is_the_release_the_configs_are_validated_with() -> None:
    version = subprocess.run(
        [str(ENVOY), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert dockerfile_stage("envoy").startswith("FROM ${ENVOY_IMAGE} ")
    image = re.search(r"^ARG ENVOY_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert image
    tag = image.group(1).rsplit(":", 1)[1].removeprefix("v")
    assert f"/{tag}/" in version.stdout, f"{image.group(1)} vs {version.stdout.strip()}"


def test_the_envoy_image_holds_the_rendered_files_where_each_profile_reads_them() -> None:
    stage = dockerfile_stage("envoy")
    copied = re.search(r"^COPY --from=edge-config /edge (\S+)$", stage, re.MULTILINE)
    assert copied
    assert f'-c", "{copied.group(1)}/envoy.yaml' in stage
    assert "envoy render" in dockerfile_stage("edge-config")
    for profile in ("compose", "k8s"):
        values = load_values(profile)
        assert values["files"]["dir"] == copied.group(1), profile
        # Deployed profiles never bake a key into the image: the JWKS is mounted.
        assert Path(values["jwt"]["jwks_file"]).is_absolute(), profile


def test_compose_builds_envoy_for_its_profile_and_mounts_the_jwks() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    envoy = services["envoy"]
    assert envoy["build"]["target"] == "envoy"
    assert envoy["build"]["args"]["ENVOY_PROFILE"] == "compose"
    jwks_dir = str(Path(load_values("compose")["jwt"]["jwks_file"]).parent)
    (volume,) = [v for v in envoy["volumes"] if v.split(":")[1] == jwks_dir]
    keys = services["jwt-keys"]
    assert keys["command"][:2] == ["envoy", "keys"]
    assert f"{volume.split(':')[0]}:{keys['command'][-1]}" in keys["volumes"]
    assert envoy["depends_on"]["jwt-keys"]["condition"] == "service_completed_successfully"


def test_kubernetes_router_limits_are_the_routers() -> None:
    source = ROOT / "services" / "tensorway" / "router" / "limits.yaml"
    copy = ROOT / "k8s" / "base" / "config" / "router-limits.yaml"
    assert copy.read_text() == source.read_text(), f"copy {source} to {copy}"
