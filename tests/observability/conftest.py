"""Fixtures of the observability tests."""

from __future__ import annotations

import pytest

from .catalogue import CATALOGUE, CatalogueEntry, read_catalogue


@pytest.fixture(scope="session")
def catalogue() -> dict[str, CatalogueEntry]:
    entries = read_catalogue(CATALOGUE.read_text())
    assert entries, f"no series found in {CATALOGUE}"
    return entries
