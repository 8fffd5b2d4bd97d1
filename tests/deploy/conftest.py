"""Fixtures of the deployment tests: the compose file and each overlay, rendered once."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from .manifests import COMPOSE_FILE, K8S, OVERLAYS, kustomize


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Overlay name → the objects `kubectl kustomize` renders for it."""
    return {overlay: kustomize(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(
    request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = rendered[request.param]
    return objects
