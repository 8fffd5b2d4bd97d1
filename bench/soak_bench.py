"""Soak: the chaos mesh under mixed real-time and batch load for a long while, the chaos suite's
faults in rotation, and every process's memory and open files watched for growth. Not run in CI
nor by `tensorway bench`; run it as `tensorway bench soak --minutes 30`.

The mesh, its real-time load (250 req/s through Envoy, see tests/chaos/mesh.py) and the faults,
each with a batch job of its own, are the chaos suite's own (tests/chaos), run here in a loop
until the time is up (the fault running then finishes). Reported:

- real-time requests and failed ones, over every fault's whole window (from the fault until the
  next one starts), and the worst p99 of each phase;
- batch jobs, rows lost and rows duplicated, over every job;
- each process's resident memory (RSS, with the processes of its group: Triton's model stubs)
  and open file descriptors, sampled every --sample-every seconds. The trend is the slope of the
  least-squares line, per hour, through each rotation's floor: the least value sampled between
  one rotation of the faults ending and the next. What a rotation allocates and frees (a pool
  reconnecting, a batch job's buffers, an allocator keeping a freed arena a while) comes and
  goes above the floor, a leak lifts it; and the first rotation, the start-up warm-up
  (connection pools filling), is left out. A component a fault restarted is a new process with a
  series of its own; a series needs three whole rotations to show a trend.

    .venv/bin/python bench/soak_bench.py [--minutes 30] [--sample-every 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The chaos suite's mesh and faults, imported rather than copied.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tensorway.devstack import Stack
from tests.chaos.faults import FAULTS, PHASES, FaultRunner
from tests.chaos.mesh import REQUESTS_PER_SECOND, chaos_state_dir, keep_logs, running_chaos_mesh

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# A series with fewer whole rotations than this shows no trend worth a figure.
MIN_ROTATIONS = 3
# A process whose fitted line grows more than this share of its mean over the run is growing.
GROWTH_SHARE = 0.10


@dataclass(frozen=True)
class Usage:
    at: float
    rss_bytes: int
    open_fds: int


def _group_members(leader: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command, which may hold spaces, end with its ")"; pgrp is the third.
        if int(stat.rsplit(")", 1)[1].split()[2]) == leader:
            members.append(int(entry))
    return members


def _usage(leader: int) -> Usage | None:
    rss, fds = 0, 0
    for pid in _group_members(leader):
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue  # gone since it was listed
    return Usage(time.monotonic(), rss, fds) if rss else None


class ProcessWatch:
    """Samples every component's process group from a thread, one series per process."""

    def __init__(self, stack: Stack, interval: float) -> None:
        self._stack = stack
        self._interval = interval
        self.series: dict[tuple[str, int], list[Usage]] = defaultdict(list)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            for name, record in self._stack.status().components.items():
                usage = _usage(record.pid)
                if usage is not None:
                    self.series[(name, record.pid)].append(usage)
            if self._stopping.wait(self._interval):
                return


def _slope_per_hour(points: list[Usage], value: str) -> float:
    hours = np.array([(p.at - points[0].at) / 3600 for p in points])
    values = np.array([float(getattr(p, value)) for p in points])
    return float(np.polyfit(hours, values, 1)[0])


def _floors(points: list[Usage], marks: list[float], value: str) -> list[Usage]:
    """The sample with the least ``value`` in each rotation, between one mark and the next, that
    falls within the series. What a rotation allocates and frees (a batch job's buffers, a pool's
    extra connection) comes and goes above this floor; a leak lifts it."""
    floors = []
    for start, end in itertools.pairwise(marks):
        rotation = [p for p in points if start < p.at <= end]
        if rotation and points[0].at <= start:
            floors.append(min(rotation, key=lambda p: getattr(p, value)))
    return floors


def trend(points: list[Usage], marks: list[float], value: str) -> tuple[float, float] | None:
    """The growth per hour of ``value`` fitted through its floor in each rotation, and the floors'
    mean; None without enough rotations."""
    floors = _floors(points, marks, value)
    if len(floors) < MIN_ROTATIONS:
        return None
    mean = sum(float(getattr(p, value)) for p in floors) / len(floors)
    return _slope_per_hour(floors, value), mean


def trends(series: dict[tuple[str, int], list[Usage]], rotation_ends: list[float]) -> list[dict[str, Any]]:
    """Per process: first and last RSS and fds, and the growth per hour fitted through the floor
    of each whole rotation it lived through, where it lived through enough of them."""
    rows = []
    for (name, pid), points in sorted(series.items()):
        rss = trend(points, rotation_ends, "rss_bytes")
        fds = trend(points, rotation_ends, "open_fds")
        span = (points[-1].at - points[0].at) / 3600
        growing = (
            rss is not None
            and fds is not None
            and (rss[0] * span > GROWTH_SHARE * rss[1] or fds[0] * span > max(GROWTH_SHARE * fds[1], 2))
        )
        rows.append(
            {
                "process": name,
                "pid": pid,
                "samples": len(points),
                "rotations": len(_floors(points, rotation_ends, "rss_bytes")),
                "minutes": round((points[-1].at - points[0].at) / 60, 1),
                "rss_mib_first": round(points[0].rss_bytes / 2**20, 1),
                "rss_mib_last": round(points[-1].rss_bytes / 2**20, 1),
                "rss_mib_per_hour": None if rss is None else round(rss[0] / 2**20, 1),
                "fds_first": points[0].open_fds,
                "fds_last": points[-1].open_fds,
                "fds_per_hour": None if fds is None else round(fds[0], 1),
                "growing": growing,
                "series": [(round(p.at - points[0].at, 1), p.rss_bytes, p.open_fds) for p in points],
            }
        )
    return rows


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [["-" if row[c] is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def soak(minutes: float, sample_every: float) -> dict[str, Any]:
    state_dir = chaos_state_dir()
    faults: list[dict[str, Any]] = []
    rotation_ends: list[float] = []
    failed_run = True
    try:
        with running_chaos_mesh(state_dir) as mesh:
            watch = ProcessWatch(mesh.stack, sample_every)
            watch.start()
            started = time.monotonic()
            runner = FaultRunner(mesh)
            try:
                for fault in itertools.cycle(FAULTS):
                    if time.monotonic() - started >= minutes * 60:
                        break
                    row, _ = runner.run(fault)
                    faults.append(row)
                    if len(faults) % len(FAULTS) == 0:
                        rotation_ends.append(time.monotonic())
                    print(
                        f"{(time.monotonic() - started) / 60:5.1f} min  {fault.label}: "
                        f"{row['failed']}/{row['requests']} failed, rows lost {row['rows_lost']}, "
                        f"duplicated {row['rows_duplicated']}",
                        file=sys.stderr,
                    )
            finally:
                watch.stop()
            run_seconds = time.monotonic() - started
        failed_run = False
    finally:
        if failed_run:
            print(f"soak: the servers' logs are in {keep_logs(state_dir)}", file=sys.stderr)
        shutil.rmtree(state_dir, ignore_errors=True)
    processes = trends(watch.series, rotation_ends)
    requests = sum(row["requests"] for row in faults)
    failed = sum(row["failed"] for row in faults)
    return {
        "benchmark": "soak",
        "minutes": round(run_seconds / 60, 1),
        "requests_per_second": REQUESTS_PER_SECOND,
        "faults": len(faults),
        "rotations": len(rotation_ends),
        "requests": requests,
        "failed": failed,
        "failed_pct": round(100 * failed / requests, 3) if requests else 0.0,
        **{
            f"worst_p99_{phase}_ms": max((r[f"p99_{phase}_ms"] or 0.0 for r in faults), default=None)
            for phase in PHASES
        },
        "batch_jobs": len(faults),
        "batch_rows": sum(row["batch_rows"] for row in faults),
        "rows_lost": sum(row["rows_lost"] for row in faults),
        "rows_duplicated": sum(row["rows_duplicated"] for row in faults),
        "growing": [f"{p['process']} ({p['pid']})" for p in processes if p["growing"]],
        "fault_rows": [
            {k: v for k, v in row.items() if k not in ("dead_after", "batch_state")} for row in faults
        ],
        "processes": processes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the faults rotate (default 30)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between process samples")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH")
    args = parser.parse_args()
    result = soak(args.minutes, args.sample_every)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("fault_rows", "processes")}
    print("\n".join(f"{key}: {value}" for key, value in summary.items()))
    print()
    print(_table(result["fault_rows"], ["fault", "requests", "failed", *(f"p99_{p}_ms" for p in PHASES)]))
    print()
    columns = [
        *("process", "pid", "samples", "rotations", "minutes"),
        *("rss_mib_first", "rss_mib_last", "rss_mib_per_hour"),
    ]
    print(_table(result["processes"], [*columns, "fds_first", "fds_last", "fds_per_hour", "growing"]))
    ok = result["failed_pct"] <= 0.1 and result["rows_lost"] == result["rows_duplicated"] == 0
    sys.exit(0 if ok and not result["growing"] else 1)


if __name__ == "__main__":
    main()
