from __future__ import annotations

import json
from pathlib import Path

from tensorway.bench_results import load_chaos
from tensorway.cli.bench import Report, physical_cores, render, run_chaos


def rows_of(markdown: str, first_cell: str) -> list[list[str]]:
    """The cells of every table row whose first cell is `first_cell`."""
    rows = []
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_quick_run_is_labelled_with_its_date_and_commands(recorded_report: Report, tmp_path: Path) -> None:
    markdown = render(recorded_report, tmp_path / "benchmarks.md", tmp_path / "benchmarks")

    assert "**Quick run.**" in markdown
    assert "Produced 2026-11-22 08:05 UTC by a **quick** run" in markdown
    assert "| realtime | `python bench/realtime_bench.py --quick` | 0 | 1.0 |" in markdown
    assert "| Triton | 2.51.0 |" in markdown
    assert "| `tensorway` package | 0.1.0 |" in markdown
    assert (tmp_path / "benchmarks.md").read_text() == markdown


def test_ratios_are_against_the_baseline_at_the_same_concurrency(
    recorded_report: Report, tmp_path: Path
) -> None:
    markdown = render(recorded_report, tmp_path / "benchmarks.md", tmp_path / "benchmarks")

    simple = rows_of(markdown, "simple")
    # group, path, in flight, requests, p50, p99, req/s, MB/s, then p50, p99 and req/s against the baseline
    assert (
        simple[0][1:]
        == ["**triton-direct**", "1", "600", "0.800", "1.600", "1,200.0", "0.310"] + ["1.00x"] * 3
    )
    assert simple[1][1:] == [
        "router",
        "1",
        "150",
        "3.200",
        "6.400",
        "300.0",
        "0.080",
        "4.00x",
        "4.00x",
        "0.25x",
    ]
    assert simple[3][8:] == ["6.25x", "4.50x", "0.16x"]
    batch = rows_of(markdown, "digits, up to 256 rows a request")
    assert batch[1][1:] == [
        "batch job (end to end)", "8", "-", "-", "-", "80,000.0", "0.540", "-", "-", "0.20x"
    ]  # fmt: skip
    # No baseline ran for this group: no ratio, rather than a made-up one.
    assert rows_of(markdown, "digits, 1 row a request")[0][-3:] == ["-", "-", "-"]


def test_aims_and_a_benchmark_without_results(recorded_report: Report, tmp_path: Path) -> None:
    markdown = render(recorded_report, tmp_path / "benchmarks.md", tmp_path / "benchmarks")

    assert rows_of(markdown, "batch")[1:] == [
        ["batch", "batch job >= 0.8x direct batched", "0.200x", "**missed**"],
        ["batch", "batch job >= 50x naive", "64.0x", "met"],
    ]
    assert "**No results**: `python bench/edge_bench.py --quick` exited with status 1" in markdown


def test_chaos_criteria_are_marked_on_the_measured_values(recorded_report: Report, tmp_path: Path) -> None:
    markdown = render(recorded_report, tmp_path / "benchmarks.md", tmp_path / "benchmarks")

    marks = {
        fault: cells[12:15]
        for fault in (
            "SIGKILL router-2",
            "SIGKILL orchestrator-1",
            "SIGKILL postgres",
            "SIGKILL batch-worker-1",
        )
        for cells in rows_of(markdown, fault)
    }
    assert marks == {
        "SIGKILL router-2": ["met", "n/a", "met"],
        # 0.11% is over the 0.1% aim; recovery of exactly 10 s meets "within 10 s".
        "SIGKILL orchestrator-1": ["**missed**", "n/a", "met"],
        # PostgreSQL is the only one of its kind: its failed requests are shown, not judged.
        "SIGKILL postgres": ["n/a", "**missed**", "**missed**"],
        "SIGKILL batch-worker-1": ["n/a", "met", "n/a"],
    }
    assert rows_of(markdown, "SIGKILL orchestrator-1")[0][5] == "0.110"
    assert "4 faults recorded; criteria missed by 2: SIGKILL orchestrator-1, SIGKILL postgres." in markdown


def test_chaos_not_run_says_why(recorded_report: Report, tmp_path: Path) -> None:
    recorded_report.chaos = None
    recorded_report.chaos_note = "Not run: `tests/chaos` does not exist in this checkout yet."

    markdown = render(recorded_report, tmp_path / "benchmarks.md", tmp_path / "benchmarks")

    assert "## Chaos\n\nNot run: `tests/chaos` does not exist in this checkout yet.\n" in markdown


def test_a_plot_per_group_with_a_latency_curve(recorded_report: Report, tmp_path: Path) -> None:
    plots = tmp_path / "benchmarks"
    plots.mkdir()
    (plots / "realtime-gone.png").write_bytes(b"from an earlier run")

    markdown = render(recorded_report, tmp_path / "benchmarks.md", plots)

    # Batch groups have latencies at one concurrency each: nothing to draw a curve through.
    assert sorted(path.name for path in plots.glob("*.png")) == ["realtime-simple.png"]
    assert (plots / "realtime-simple.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "![realtime: simple](benchmarks/realtime-simple.png)" in markdown


def test_chaos_fields_the_report_does_not_know_are_left_out(tmp_path: Path) -> None:
    results = tmp_path / "chaos.json"
    results.write_text(
        json.dumps(
            {"faults": [{"fault": "slow Triton", "component": "triton", "hedged": 3, "p99_ms": 250.0}]}
        )
    )

    (fault,) = load_chaos(results)

    assert (fault.fault, fault.p99_ms, fault.requests) == ("slow Triton", 250.0, None)
    assert (fault.failures_mark(), fault.rows_mark(), fault.recovery_mark()) == ("n/a", "n/a", "n/a")


def test_physical_cores_from_cpuinfo() -> None:
    block = "processor\t: {}\nphysical id\t: 0\ncore id\t\t: {}\n"
    cpuinfo = "\n".join(block.format(cpu, cpu // 2) for cpu in range(4))  # two threads a core

    assert physical_cores(cpuinfo) == 2
    assert physical_cores("processor\t: 0\nmodel name\t: a VM\n") is None


def test_the_chaos_run_hands_its_results_file_over_and_names_failing_tests(tmp_path: Path) -> None:
    # A stand-in suite in a checkout of its own: one fault recorded, one test that fails.
    suite = tmp_path / "tests" / "chaos"
    suite.mkdir(parents=True)
    (suite / "test_stand_in.py").write_text(
        "import json, os\n"
        "def test_records():\n"
        "    with open(os.environ['TENSORWAY_CHAOS_RESULTS'], 'w') as out:\n"
        "        json.dump({'faults': [{'fault': 'SIGKILL router-2', 'component': 'router',"
        " 'redundant': True, 'requests': 10, 'failed': 0}]}, out)\n"
        "def test_postgres():\n"
        "    assert False\n"
    )
    results_dir = tmp_path / "results"
    results_dir.mkdir()

    step, faults, note = run_chaos(tmp_path, results_dir)

    assert step.returncode == 1
    assert step.command == "TENSORWAY_CHAOS_RESULTS=results/chaos.json python -m pytest tests/chaos"
    assert faults is not None
    assert [(f.fault, f.failures_mark()) for f in faults] == [("SIGKILL router-2", "met")]
    assert note == (
        "**The chaos suite failed** (pytest exit status 1). Failing tests, whose faults are missing"
        " from the table or incomplete: `test_postgres`"
    )
