"""Fixtures of the observability tests: the catalogue, and Prometheus's binaries from Debian."""

from __future__ import annotations

import shutil

import pytest

from .catalogue import CATALOGUE, CatalogueEntry, read_catalogue


@pytest.fixture(scope="session")
def catalogue() -> dict[str, CatalogueEntry]:
    entries = read_catalogue(CATALOGUE.read_text())
    assert entries, f"no series found in {CATALOGUE}"
    return entries


def debian_prometheus_binary(name: str) -> str:
    """Path of `prometheus` or `promtool`, which Debian's prometheus package ships and `make setup`
    installs; a failure saying so when it is missing (a test never installs anything)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is missing: run `make setup`, which installs Debian's prometheus package "
            "(or apt-get install prometheus)"
        )
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return debian_prometheus_binary("promtool")
