"""One benchmark, very short, end to end: its results file is what the report reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tensorway.bench_results import BenchResults
from tensorway.cli.bench import BENCHMARKS, Report, Step, render

ROOT = Path(__file__).parents[2]
MESH_PATH = "mesh: upload, register, deploy, first routed answer"


def test_every_benchmark_the_report_runs_is_a_script_in_bench() -> None:
    assert "lifecycle" in BENCHMARKS
    for name in BENCHMARKS:
        assert (ROOT / "bench" / f"{name}_bench.py").is_file(), name


def test_realtime_bench_writes_results_the_report_reads(tmp_path: Path) -> None:
    output = tmp_path / "realtime.json"
    command = [sys.executable, "bench/realtime_bench.py", "--quick", "--json", str(output)]
    short = ["--workload", "simple", "--concurrency", "1", "2", "--seconds", "0.2"]

    finished = subprocess.run(
        [*command, *short], check=False, cwd=ROOT, capture_output=True, text=True, timeout=100
    )

    assert finished.returncode == 0, finished.stderr[-3000:]
    results = BenchResults.from_json(json.loads(output.read_text()))
    assert results.mode == "quick"
    assert results.versions["Triton"]
    assert {(c.path, c.concurrency) for c in results.cells} == {
        (path, concurrency)
        for path in (
            "triton-direct",
            "floor: 1 bare proxy",
            "floor: 2 bare proxies",
            "orchestrator",
            "orchestrator-triton",
            "router",
            "router-triton",
        )
        for concurrency in (1, 2)
    }
    assert all(c.requests and c.p50_ms and c.p99_ms and c.p50_ms <= c.p99_ms for c in results.cells)
    assert "triton-direct" in finished.stdout  # the human-readable table is still printed


def test_lifecycle_bench_times_both_paths_and_the_report_shows_them(tmp_path: Path) -> None:
    output = tmp_path / "lifecycle.json"
    command = [
        sys.executable,
        "bench/lifecycle_bench.py",
        "--quick",
        "--repetitions",
        "1",
        "--json",
        str(output),
    ]

    finished = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=400)

    assert finished.returncode == 0, finished.stderr[-3000:]
    results = BenchResults.from_json(json.loads(output.read_text()))
    assert results.benchmark == "lifecycle"
    assert results.mode == "quick"
    assert [cell.path for cell in results.cells] == [results.baseline, MESH_PATH]
    for cell in results.cells:
        assert cell.requests == 1
        longest = cell.extra["max ms"]
        assert cell.p50_ms is not None
        assert longest is not None
        assert 0 < cell.p50_ms <= longest
    mesh = results.cells[1]
    # The first answer comes after the deployment, which comes after the upload.
    upload, deploy_to_answer = mesh.extra["upload p50 ms"], mesh.extra["deploy→answer p50 ms"]
    assert upload is not None
    assert deploy_to_answer is not None
    assert mesh.p50_ms is not None
    assert 0 < upload < deploy_to_answer <= mesh.p50_ms

    step = Step("lifecycle", "python bench/lifecycle_bench.py --quick", 0, 60.0)
    report = Report(mode="quick", produced="now", machine={}, versions={}, steps=[step])
    report.results["lifecycle"] = results
    markdown = render(report, tmp_path / "benchmarks.md", tmp_path / "benchmarks")
    assert "## Lifecycle: time from a model directory on disk to its first routed answer" in markdown
    assert MESH_PATH in markdown
