"""What a benchmark run writes and `tensorway bench` reads: each `bench/*_bench.py` script's
results (the JSON `bench/benchkit.py` writes) and the chaos suite's faults, with the chaos
criteria they are judged by. Shared by the benchmark kit, the chaos suite and the report, so
none of them reads another's module for its schema."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# The chaos suite's criteria: failed requests while a redundant component is down, and the time
# the mesh takes to serve again.
MAX_FAILED_PERCENT = 0.1
MAX_RECOVERY_SECONDS = 10.0
MET, MISSED, NOT_APPLICABLE = "met", "**missed**", "n/a"


@dataclass(frozen=True)
class CellResult:
    """One path of one group at one concurrency, as a benchmark measured it."""

    group: str
    path: str
    concurrency: int
    seconds: float
    throughput: float
    requests: int | None
    p50_ms: float | None
    p99_ms: float | None
    extra: dict[str, float | None]


@dataclass(frozen=True)
class BenchResults:
    """A benchmark's results file."""

    benchmark: str
    title: str
    mode: str
    baseline: str
    throughput_unit: str
    started: str
    finished: str | None
    settings: dict[str, Any]
    versions: dict[str, str]
    cells: list[CellResult]
    aims: list[dict[str, Any]]
    notes: list[str]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResults:
        return cls(
            benchmark=str(data["benchmark"]),
            title=str(data["title"]),
            mode=str(data["mode"]),
            baseline=str(data["baseline"]),
            throughput_unit=str(data["throughput_unit"]),
            started=str(data["started"]),
            finished=data.get("finished"),
            settings=dict(data.get("settings", {})),
            versions={str(k): str(v) for k, v in data.get("versions", {}).items()},
            cells=[CellResult(**cell) for cell in data["cells"]],
            aims=list(data.get("aims", [])),
            notes=[str(note) for note in data.get("notes", [])],
        )

    def baseline_of(self, cell: CellResult) -> CellResult | None:
        """The baseline's cell of the same group at the same concurrency, if it ran."""
        return next(
            (
                c
                for c in self.cells
                if c.path == self.baseline and c.group == cell.group and c.concurrency == cell.concurrency
            ),
            None,
        )

    def groups(self) -> list[str]:
        return list(dict.fromkeys(cell.group for cell in self.cells))


@dataclass(frozen=True)
class ChaosFault:
    """One fault the chaos suite injected, and what it measured (None where it does not apply)."""

    fault: str
    component: str
    redundant: bool | None = None
    requests: int | None = None
    failed: int | None = None
    failed_pct: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    recovery_s: float | None = None
    batch_rows: int | None = None
    rows_lost: int | None = None
    rows_duplicated: int | None = None
    note: str | None = None

    def failed_percent(self) -> float | None:
        """The share of failed requests, from the counts when the suite gave no percentage."""
        if self.failed_pct is not None:
            return self.failed_pct
        if self.failed is not None and self.requests:
            return 100 * self.failed / self.requests
        return None

    def failures_mark(self) -> str:
        # The 0.1% aim is for a redundant component: one that is the only one of its kind may fail requests.
        percent = self.failed_percent()
        if not self.redundant or percent is None:
            return NOT_APPLICABLE
        return MET if percent <= MAX_FAILED_PERCENT else MISSED

    def rows_mark(self) -> str:
        if self.rows_lost is None and self.rows_duplicated is None:
            return NOT_APPLICABLE
        return MET if not self.rows_lost and not self.rows_duplicated else MISSED

    def recovery_mark(self) -> str:
        if self.recovery_s is None:
            return NOT_APPLICABLE
        return MET if self.recovery_s <= MAX_RECOVERY_SECONDS else MISSED


def load_chaos(path: Path) -> list[ChaosFault]:
    """The chaos suite's faults; fields this report does not know are left out, not fatal."""
    known = {f.name for f in fields(ChaosFault)}
    data = json.loads(path.read_text())
    return [ChaosFault(**{k: v for k, v in fault.items() if k in known}) for fault in data["faults"]]
