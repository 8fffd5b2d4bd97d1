"""The soak's growth verdict: a swing that comes and goes each rotation is not growth, a rising
floor is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
ROTATION_SECONDS = 90.0
ROTATIONS = 20


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak_bench", ROOT / "bench" / "soak_bench.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak_bench"] = module
    spec.loader.exec_module(module)
    return module


def run(soak: ModuleType, rss_mib: list[float], fds: list[int]) -> dict[str, object]:
    """The verdict on a process sampled every 5 s for ROTATIONS rotations of 90 s: sample i
    has rss_mib[i] MiB and fds[i] descriptors."""
    samples_per_rotation = int(ROTATION_SECONDS / 5)
    points = [
        soak.Usage(5.0 * i, int(rss_mib[i] * MIB), fds[i]) for i in range(ROTATIONS * samples_per_rotation)
    ]
    rotation_ends = [ROTATION_SECONDS * (r + 1) - 1 for r in range(ROTATIONS)]
    (row,) = soak.trends({("batch", 1): points}, rotation_ends)
    return dict(row)


def test_a_swing_that_returns_every_rotation_is_not_growth(soak: ModuleType) -> None:
    count = ROTATIONS * 18
    # Bimodal like an allocator that keeps a freed arena for a while, landing on the rotation
    # ends more often late in the run than early: the samples at the ends alone would rise.
    rss = [160.0 if (i % 18 == 17 and i > count // 2) or i % 7 == 0 else 155.0 for i in range(count)]
    fds = [27 if i % 18 == 17 and i > count // 2 else 22 for i in range(count)]
    row = run(soak, rss, fds)
    assert row["growing"] is False, row
    assert abs(float(row["rss_mib_per_hour"])) < 1  # type: ignore[arg-type]
    assert row["rotations"] == ROTATIONS - 1


def test_a_rising_floor_is_growth(soak: ModuleType) -> None:
    count = ROTATIONS * 18
    # 3 MiB more every rotation under the same swing: 120 MiB an hour.
    rss = [155.0 + 3.0 * (i // 18) + (5.0 if i % 7 == 0 else 0.0) for i in range(count)]
    row = run(soak, rss, [22] * count)
    assert row["growing"] is True, row
    assert 100 < float(row["rss_mib_per_hour"]) < 140  # type: ignore[arg-type]


def test_leaking_descriptors_are_growth(soak: ModuleType) -> None:
    count = ROTATIONS * 18
    row = run(soak, [155.0] * count, [22 + i // 36 for i in range(count)])
    assert row["growing"] is True, row
    assert row["rss_mib_per_hour"] == 0
