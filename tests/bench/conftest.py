"""The report renderer on results recorded from earlier runs: no benchmark or server runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tensorway.bench_results import BenchResults, load_chaos
from tensorway.cli.bench import Report, Step

RECORDED = Path(__file__).parent / "recorded"


@pytest.fixture
def recorded_report() -> Report:
    """A quick run of the real-time and batch benchmarks, the edge's failed, and a chaos run."""
    report = Report(
        mode="quick",
        produced="2026-11-22 08:05 UTC",
        machine={"CPU": "Example CPU (x86_64)", "logical CPUs": "2"},
        versions={"tensorway": "0.1.0"},
    )
    for name in ("realtime", "batch"):
        report.results[name] = BenchResults.from_json(json.loads((RECORDED / f"{name}.json").read_text()))
        report.steps.append(Step(name, f"python bench/{name}_bench.py --quick", 0, 60.0))
    report.steps.append(Step("edge", "python bench/edge_bench.py --quick", 1, 6.0))
    report.chaos = load_chaos(RECORDED / "chaos.json")
    report.steps.append(Step("chaos", "python -m pytest tests/chaos", 0, 54.0))
    return report
