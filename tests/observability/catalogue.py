"""The metrics catalogue (docs/metrics.md) read as data, and where the dashboards and alert
rules live."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
CATALOGUE = DOCS / "metrics.md"
OBSERVABILITY = DOCS / "observability"
SERIES_NAME = re.compile(r"\b((?:tensorway|nv)_[a-z0-9_]+)\b")


@dataclass(frozen=True)
class CatalogueEntry:
    """One row of the catalogue."""

    name: str
    kind: str
    labels: frozenset[str]
    present: str
    """`always`, `traffic` or `event`: when a scrape must show the series."""
    exporters: tuple[str, ...]
    """Local-stack components whose metrics endpoint exports it; empty while only planned."""


def read_catalogue(text: str) -> dict[str, CatalogueEntry]:
    """Rows of the catalogue's tables, each with the exporters its section names."""
    entries: dict[str, CatalogueEntry] = {}
    exporters: tuple[str, ...] = ()
    for line in text.splitlines():
        if line.startswith("## "):
            exporters = ()
        elif line.startswith("Exported by:"):
            exporters = tuple(re.findall(r"`([^`]+)`", line))
        elif line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            name = cells[0].strip("`")
            assert name not in entries, f"{name} is catalogued twice"
            entries[name] = CatalogueEntry(
                name=name,
                kind=cells[1],
                labels=frozenset(re.findall(r"`([^`]+)`", cells[2])),
                present=cells[3],
                exporters=exporters,
            )
    return entries


def queried_series(expression: str, catalogue: dict[str, CatalogueEntry]) -> set[str]:
    """Catalogue names an expression reads: a histogram's `_bucket`, `_sum`, `_count` as the histogram."""
    names = set()
    for name in SERIES_NAME.findall(expression):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        histogram = catalogue.get(base)
        names.add(base if histogram is not None and histogram.kind == "histogram" else name)
    return names
