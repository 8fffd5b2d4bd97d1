"""Measured rollouts: a deployment's traffic moves from one version to another step by step,
and each step is judged by what the routers measured before the next one.

The rule:

- **Steps.** The new version gets each step's percent of the traffic the two versions share
  (100 less the weights of the deployment's other versions, which are left alone). A step is
  applied through `Registry.update_deployment`, the path UpdateDeployment takes, so routers
  get it from WatchRoutes like any traffic change.
- **Judging.** After `interval`, the new version's figures since the step started are
  compared with the old version's over the same time; both come from the routers' reports
  (ReportTraffic), summed over routers. The step holds until the new version has answered
  `min_requests`. It fails when the new version's server error rate exceeds the old one's by
  more than `max_error_rate`, when its p99 exceeds `max_p99_ratio` times the old one's (judged
  only once the old version too has `min_requests`), or when more than `max_mismatch_share`
  of the shadow comparisons between the two disagree (where one shadows the other, again
  from `min_requests` comparisons). A failed step rolls the new version back to 0% and the
  rollout ends ROLLED_BACK with the reason; a passed step moves on, and the step that
  reaches 100% ends it SUCCEEDED.
- **State.** Rollouts live in PostgreSQL; every replica runs a `RolloutDriver`, and a step
  due is taken with `FOR UPDATE SKIP LOCKED`, so exactly one replica judges it and a restart
  of any replica (or all) resumes where the table says. One rollout per model at a time.
- **Pause, resume, abort.** A paused rollout leaves traffic where it is; resuming measures
  the step afresh from then. Aborting gives the new version's traffic back to the old one.

This module holds what a rollout is (its steps, interval, bounds and state, the split a step
puts in force, the traffic reports it is judged by) and the shape rules for both; the verdict
is `rollout_judging`'s, the state in PostgreSQL and the taking of due steps `rollout_store`'s,
the loop every replica runs `rollout_driver`'s, and the protobuf conversion `converters`'.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise

from tensorway.registry import validation
from tensorway.registry.domain import Deployment, TrafficSplit
from tensorway.registry.rollout_judging import Figures, RolloutBounds
from tensorway.runtime import FieldViolation

ROLLOUT = "tensorway.registry.v1.Rollout"

DEFAULT_STEPS = (5, 25, 50, 100)
DEFAULT_INTERVAL = timedelta(seconds=60)
MIN_INTERVAL = timedelta(seconds=1)
MAX_INTERVAL = timedelta(days=1)


class RolloutState(enum.Enum):
    """Where a rollout stands; RUNNING and PAUSED are active, the others are ends."""

    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    ROLLED_BACK = "ROLLED_BACK"
    ABORTED = "ABORTED"

    @property
    def active(self) -> bool:
        return self in (RolloutState.RUNNING, RolloutState.PAUSED)


@dataclass(frozen=True)
class Rollout:
    """A deployment's traffic moving from `from_version` to `to_version` in measured steps."""

    model: str
    deployment: str
    to_version: str
    from_version: str = ""
    id: str = ""
    steps: tuple[int, ...] = DEFAULT_STEPS
    interval: timedelta = DEFAULT_INTERVAL
    bounds: RolloutBounds = field(default_factory=RolloutBounds)
    state: RolloutState = RolloutState.RUNNING
    step_index: int = 0
    reason: str = ""
    to_figures: Figures = field(default_factory=Figures)
    from_figures: Figures = field(default_factory=Figures)
    create_time: datetime | None = None
    step_start_time: datetime | None = None
    end_time: datetime | None = None

    @property
    def percent(self) -> int:
        """The new version's percent of the shared traffic at the step in force."""
        return self.steps[self.step_index]


def split_at(deployment: Deployment, rollout: Rollout, percent: int) -> tuple[TrafficSplit, ...]:
    """The deployment's traffic with `percent` of what the two versions share on the new one;
    the other versions keep their weights."""
    others = [s for s in deployment.traffic if s.version not in (rollout.from_version, rollout.to_version)]
    shared = 100 - sum(s.weight for s in others)
    to_weight = round(shared * percent / 100)
    moved = {rollout.from_version: shared - to_weight, rollout.to_version: to_weight}
    traffic = [
        TrafficSplit(s.version, moved.pop(s.version)) if s.version in moved else s for s in deployment.traffic
    ]
    return (*traffic, *(TrafficSplit(version, weight) for version, weight in moved.items()))


def check_rollout(rollout: Rollout) -> None:
    """Shape only: the versions and the deployment are checked against the registry's rows."""
    violations = validation.dns_label(rollout.to_version, "rollout.to_version")
    if rollout.from_version:
        violations += validation.dns_label(rollout.from_version, "rollout.from_version")
        if rollout.from_version == rollout.to_version:
            violations.append(FieldViolation("rollout.from_version", "not the version rolled out"))
    violations += validation.dns_label(rollout.deployment, "rollout.deployment")
    steps = rollout.steps
    if not steps or steps[-1] != 100 or any(not 0 < s <= 100 for s in steps):
        violations.append(FieldViolation("rollout.steps", "percents in 1..100, the last one 100"))
    elif any(a >= b for a, b in pairwise(steps)):
        violations.append(FieldViolation("rollout.steps", "rising"))
    if not MIN_INTERVAL <= rollout.interval <= MAX_INTERVAL:
        violations.append(FieldViolation("rollout.interval", "from 1 s to 1 day"))
    bounds = rollout.bounds
    for name, value in (
        ("max_error_rate", bounds.max_error_rate),
        ("max_mismatch_share", bounds.max_mismatch_share),
    ):
        if not 0.0 <= value <= 1.0:
            violations.append(FieldViolation(f"rollout.bounds.{name}", "a share, 0..1"))
    if not 1.0 <= bounds.max_p99_ratio <= 1000.0:
        violations.append(FieldViolation("rollout.bounds.max_p99_ratio", "1..1000"))
    if not 1 <= bounds.min_requests <= 10**9:
        violations.append(FieldViolation("rollout.bounds.min_requests", "1..1e9"))
    validation.raise_if(violations, "rollout")


@dataclass(frozen=True)
class VersionTraffic:
    """What one router answered for one model version since its last report."""

    model: str
    version: str
    requests: int
    server_errors: int
    latency_bounds: tuple[float, ...]
    latency_counts: tuple[int, ...]
    shadow_matches: int = 0
    shadow_mismatches: int = 0


def check_traffic(reports: Sequence[VersionTraffic]) -> None:
    violations = []
    for index, report in enumerate(reports):
        prefix = f"versions[{index}]"
        violations += validation.model_id(report.model, f"{prefix}.model")
        violations += validation.dns_label(report.version, f"{prefix}.version")
        if len(report.latency_bounds) != len(report.latency_counts) or len(report.latency_bounds) > 64:
            violations.append(FieldViolation(f"{prefix}.latency_counts", "one count per bound, at most 64"))
        counts = (report.requests, report.server_errors, report.shadow_matches, report.shadow_mismatches)
        if min(counts + report.latency_counts, default=0) < 0:
            violations.append(FieldViolation(prefix, "counts are not negative"))
        if any(math.isnan(bound) for bound in report.latency_bounds):
            violations.append(FieldViolation(f"{prefix}.latency_bounds", "numbers"))
    validation.raise_if(violations, "versions")
