"""One benchmark, very short, end to end: its results file is what the report reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tensorway.bench_results import BenchResults

ROOT = Path(__file__).parents[2]


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
