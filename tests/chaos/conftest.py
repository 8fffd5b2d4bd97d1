"""The chaos suite's mesh (tests/chaos/mesh.py), its fault runner, and its report.

When TENSORWAY_CHAOS_RESULTS names a file, the fault table is written there as JSON; it is
printed at the end of the session either way.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .faults import PHASES, FaultRunner
from .mesh import ChaosMesh, chaos_state_dir, keep_logs, running_chaos_mesh

RESULTS_ENV = "TENSORWAY_CHAOS_RESULTS"
RESULTS_KEY = pytest.StashKey[list[dict[str, Any]]]()
LOGS_KEY = pytest.StashKey[Path]()


# Package scope: the mesh stops once the last chaos test ran, not at the end of a whole `make test`.
@pytest.fixture(scope="package")
def chaos_mesh(request: pytest.FixtureRequest) -> Iterator[ChaosMesh]:
    state_dir = chaos_state_dir()
    try:
        with running_chaos_mesh(state_dir) as mesh:
            yield mesh
    finally:
        if request.session.testsfailed:
            # The servers' logs say what went wrong; they outlive the state dir.
            request.config.stash[LOGS_KEY] = keep_logs(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="package")
def chaos_faults(chaos_mesh: ChaosMesh) -> FaultRunner:
    """Runs the suite's faults in turn, each window open until the next fault starts."""
    return FaultRunner(chaos_mesh)


@pytest.fixture(scope="session")
def chaos_results(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """The fault table, one row a fault, reported at the end of the session."""
    return request.config.stash.setdefault(RESULTS_KEY, [])


_COLUMNS = (
    ("fault", "{}"),
    ("requests", "{}"),
    ("failed", "{}"),
    ("failed_pct", "{:.3f}"),
    ("p50_ms", "{:.1f}"),
    ("p99_ms", "{:.1f}"),
    *((f"p99_{phase}_ms", "{:.1f}") for phase in PHASES),
    ("recovery_s", "{:.2f}"),
    ("batch_rows", "{}"),
    ("rows_lost", "{}"),
    ("rows_duplicated", "{}"),
)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    logs = config.stash.get(LOGS_KEY, None)
    if logs is not None:
        terminalreporter.write_line(f"chaos: a test failed; the servers' logs are in {logs}")
    results = config.stash.get(RESULTS_KEY, [])
    if not results:
        return
    path = os.environ.get(RESULTS_ENV)
    if path:
        Path(path).write_text(json.dumps({"faults": results}, indent=2) + "\n")
    rows = [
        [("-" if row[key] is None else form.format(row[key])) for key, form in _COLUMNS] for row in results
    ]
    widths = [max(len(key), *(len(row[i]) for row in rows)) for i, (key, _) in enumerate(_COLUMNS)]
    terminalreporter.section("chaos: faults under load")
    terminalreporter.write_line("  ".join(key.ljust(w) for (key, _), w in zip(_COLUMNS, widths, strict=True)))
    for row in rows:
        terminalreporter.write_line("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for result in results:
        if result["note"]:
            terminalreporter.write_line(f"{result['fault']}: {result['note']}")
    if path:
        terminalreporter.write_line(f"written to {path}")
