"""Fixtures of the observability tests: the catalogue, and Prometheus's binaries from Debian."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .catalogue import CATALOGUE, CatalogueEntry, read_catalogue


@pytest.fixture(scope="session")
def catalogue() -> dict[str, CatalogueEntry]:
    entries = read_catalogue(CATALOGUE.read_text())
    assert entries, f"no series found in {CATALOGUE}"
    return entries


def _install_prometheus() -> None:
    # CI runs on Debian as root: promtool and prometheus come with Debian's prometheus package.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "prometheus"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


def debian_prometheus_binary(name: str) -> str:
    """Path of `prometheus` or `promtool`, installing Debian's package when it is missing and
    the tests run as root; a failure saying what to install otherwise."""
    path = shutil.which(name)
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_prometheus()
        path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's prometheus package (apt-get install prometheus)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return debian_prometheus_binary("promtool")
