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
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any, LiteralString, Protocol

from google.protobuf.duration_pb2 import Duration
from psycopg import errors
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from tensorway.registry import validation
from tensorway.registry.domain import MODEL, Deployment, Model, Page, TrafficSplit
from tensorway.registry.rows import MAX_PAGE_SIZE
from tensorway.registry.store import open_database
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.runtime import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    TensorwayError,
)
from tensorway.runtime.postgres import Connection, Database, PageCursor

logger = logging.getLogger(__name__)

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
class RolloutBounds:
    """How far the new version may fall behind the old one in a step."""

    max_error_rate: float = 0.01
    """By how much the new version's server error rate may exceed the old one's."""
    max_p99_ratio: float = 1.5
    """How many times the old version's p99 latency the new version's may be."""
    max_mismatch_share: float = 0.01
    """Share of shadow comparisons between the two versions that may disagree."""
    min_requests: int = 100
    """Answers of the new version in a step before it is judged."""


@dataclass(frozen=True)
class Figures:
    """One version's answers over a span of time, as the routers reported them."""

    requests: int = 0
    server_errors: int = 0
    latency: Mapping[float, int] = field(default_factory=dict)
    """Answers per latency bucket, by the bucket's upper bound in seconds."""
    shadow_compared: int = 0
    shadow_mismatches: int = 0

    @property
    def error_rate(self) -> float:
        return self.server_errors / self.requests if self.requests else 0.0

    def p99(self) -> float:
        """The upper bound of the bucket the 99th percentile answer fell in (0 with none)."""
        total = sum(self.latency.values())
        seen = 0
        for bound in sorted(self.latency):
            seen += self.latency[bound]
            if seen >= 0.99 * total:
                return bound
        return 0.0


class Verdict(enum.Enum):
    WAIT = "WAIT"
    WITHIN_BOUNDS = "WITHIN_BOUNDS"
    FAIL = "FAIL"


def judge(bounds: RolloutBounds, new: Figures, old: Figures, to: str, frm: str) -> tuple[Verdict, str]:
    """Whether a step of version `to` against version `frm` passes, fails (and why), or waits."""
    if new.requests < bounds.min_requests:
        return Verdict.WAIT, (
            f"waiting for {bounds.min_requests} answers of version {to} in this step ({new.requests} so far)"
        )
    # Too few answers of the old version tell nothing about it: the new one is held to none.
    old_rate = old.error_rate if old.requests >= bounds.min_requests else 0.0
    if new.error_rate > old_rate + bounds.max_error_rate:
        return Verdict.FAIL, (
            f"version {to} failed {new.server_errors} of {new.requests} requests ({new.error_rate:.1%})"
            f" against {old_rate:.1%} for version {frm}; at most {bounds.max_error_rate:.1%} more is allowed"
        )
    if old.requests >= bounds.min_requests:
        new_p99, old_p99 = new.p99(), old.p99()
        if new_p99 > bounds.max_p99_ratio * old_p99:
            return Verdict.FAIL, (
                f"version {to}'s p99 latency {new_p99 * 1000:g} ms is more than {bounds.max_p99_ratio:g}"
                f" times version {frm}'s {old_p99 * 1000:g} ms"
            )
    compared = new.shadow_compared + old.shadow_compared
    mismatches = new.shadow_mismatches + old.shadow_mismatches
    if compared >= bounds.min_requests and mismatches > bounds.max_mismatch_share * compared:
        return Verdict.FAIL, (
            f"{mismatches} of {compared} shadow comparisons between versions {frm} and {to} disagreed"
            f" ({mismatches / compared:.1%}); at most {bounds.max_mismatch_share:.1%} may"
        )
    return Verdict.WITHIN_BOUNDS, ""


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
    bounds: RolloutBounds = RolloutBounds()
    state: RolloutState = RolloutState.RUNNING
    step_index: int = 0
    reason: str = ""
    to_figures: Figures = Figures()
    from_figures: Figures = Figures()
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


class DeploymentWriter(Protocol):
    """What a rollout needs of the registry: its deployments, written as UpdateDeployment does."""

    async def get_model(self, name: str) -> Model: ...

    async def list_deployments(self, model: str, page_size: int, page_token: str) -> Page[Deployment]: ...

    async def get_deployment(self, model: str, name: str) -> Deployment: ...

    async def update_deployment(self, deployment: Deployment, mask: Sequence[str]) -> Deployment: ...


_SELECT_ROLLOUT: LiteralString = (
    "SELECT *, extract(epoch FROM step_interval) AS interval_seconds FROM rollouts"
)
# The figures of one version since a time, summed over the routers' reports and latency buckets.
_FIGURES: LiteralString = """
SELECT coalesce(sum(requests), 0) AS requests, coalesce(sum(server_errors), 0) AS server_errors,
  coalesce(sum(shadow_matches + shadow_mismatches), 0) AS shadow_compared,
  coalesce(sum(shadow_mismatches), 0) AS shadow_mismatches,
  (SELECT coalesce(jsonb_agg(jsonb_build_array(b.bound::text, b.count)), '[]') FROM (
     SELECT bound, sum(count) AS count
     FROM version_traffic t2, unnest(t2.latency_bounds, t2.latency_counts) AS u(bound, count)
     WHERE t2.model = %(model)s AND t2.version = %(version)s AND t2.report_time >= %(since)s
     GROUP BY bound) b) AS latency
FROM version_traffic
WHERE model = %(model)s AND version = %(version)s AND report_time >= %(since)s
"""


def _figures_json(figures: Figures) -> Jsonb:
    return Jsonb(
        {
            "requests": figures.requests,
            "server_errors": figures.server_errors,
            "p99_seconds": figures.p99(),
            "shadow_compared": figures.shadow_compared,
            "shadow_mismatches": figures.shadow_mismatches,
        }
    )


def _figures_from_json(data: Mapping[str, Any] | None) -> Figures:
    if not data:
        return Figures()
    # Stored figures keep their p99 as a one-bucket histogram: all that is shown of them.
    return Figures(
        requests=data["requests"],
        server_errors=data["server_errors"],
        latency={float(data["p99_seconds"]): 1} if data["requests"] else {},
        shadow_compared=data["shadow_compared"],
        shadow_mismatches=data["shadow_mismatches"],
    )


def rollout_from_row(row: Mapping[str, Any]) -> Rollout:
    bounds = row["bounds"]
    return Rollout(
        model=row["model"],
        id=str(row["id"]),
        deployment=row["deployment"],
        from_version=row["from_version"],
        to_version=row["to_version"],
        steps=tuple(row["steps"]),
        interval=timedelta(seconds=float(row["interval_seconds"])),
        bounds=RolloutBounds(**bounds),
        state=RolloutState(row["state"]),
        step_index=row["step_index"],
        reason=row["reason"],
        to_figures=_figures_from_json(row["to_figures"]),
        from_figures=_figures_from_json(row["from_figures"]),
        create_time=row["create_time"],
        step_start_time=row["step_start_time"],
        end_time=row["end_time"],
    )


class Rollouts:
    """Starts, reads, pauses, resumes and aborts rollouts, records the routers' traffic
    reports, and (`step_due`) judges the steps that are due.

    Its database is a small pool of its own beside the registry's: a step or an abort holds a
    connection (and its rollout's row lock) while the deployment write it makes through the
    registry takes another, so in one pool a few of them at once could hold every connection
    and each wait for a second."""

    def __init__(self, database: Database, registry: DeploymentWriter) -> None:
        self._database = database
        self._registry = registry

    @classmethod
    async def open(
        cls,
        url: str,
        registry: DeploymentWriter,
        *,
        wait: timedelta,
        retry_after: timedelta,
        pool_size: int = 3,
    ) -> Rollouts:
        """Connect (the registry's store has migrated the schema, so nothing is left to apply)."""
        return cls(await open_database(url, size=pool_size, wait=wait, retry_after=retry_after), registry)

    async def close(self) -> None:
        await self._database.close()

    async def start(self, rollout: Rollout) -> Rollout:
        """Start `rollout` (its deployment, or the model's only one; its old version, or the
        deployment's heaviest other) and put its first step in force."""
        if not rollout.deployment:
            deployments = await self._registry.list_deployments(rollout.model, 2, "")
            if len(deployments.items) != 1:
                raise InvalidArgument(
                    f"model {rollout.model!r} has {len(deployments.items)} deployments;"
                    " name the one to roll out",
                    [FieldViolation("rollout.deployment", "models/{model}/deployments/{deployment}")],
                )
            rollout = replace(rollout, deployment=deployments.items[0].name)
        check_rollout(rollout)
        deployment = await self._registry.get_deployment(rollout.model, rollout.deployment)
        if not rollout.from_version:
            weighted = [s for s in deployment.traffic if s.version != rollout.to_version and s.weight > 0]
            if not weighted:
                raise FailedPrecondition(
                    f"deployment {rollout.deployment} sends no traffic to a version other than"
                    f" {rollout.to_version}"
                )
            rollout = replace(rollout, from_version=max(weighted, key=lambda s: s.weight).version)
        if rollout.from_version not in {s.version for s in deployment.traffic}:
            raise FailedPrecondition(
                f"deployment {rollout.deployment} has no traffic split for version {rollout.from_version}"
            )
        async with self._database.transaction() as connection:
            try:
                cursor = await connection.execute(
                    "INSERT INTO rollouts (model, deployment, from_version, to_version, steps, step_interval,"
                    " bounds, state) VALUES (%(model)s, %(deployment)s, %(from)s, %(to)s, %(steps)s,"
                    " make_interval(secs => %(interval)s), %(bounds)s, 'RUNNING') RETURNING id",
                    {
                        "model": rollout.model,
                        "deployment": rollout.deployment,
                        "from": rollout.from_version,
                        "to": rollout.to_version,
                        "steps": list(rollout.steps),
                        "interval": rollout.interval.total_seconds(),
                        "bounds": Jsonb(rollout.bounds.__dict__),
                    },
                )
            except errors.UniqueViolation as exc:
                raise FailedPrecondition(
                    f"model {rollout.model!r} has a rollout running or paused; abort it or let it end first"
                ) from exc
            except errors.ForeignKeyViolation as exc:
                raise NotFound(MODEL, f"models/{rollout.model}") from exc
            row = await cursor.fetchone()
            assert row is not None
            started = replace(rollout, id=str(row["id"]))
        # After the insert commits: its foreign key holds the model's row, which the deployment
        # write locks. A first step the deployment refuses leaves no rollout behind.
        try:
            await self._apply(started, started.steps[0])
        except TensorwayError:
            async with self._database.transaction() as connection:
                await connection.execute(
                    "DELETE FROM rollouts WHERE model = %(model)s AND id = %(id)s",
                    {"model": started.model, "id": int(started.id)},
                )
            raise
        logger.info(
            "rollout started",
            extra={"model": rollout.model, "rollout": started.id, "to_version": rollout.to_version},
        )
        return await self.get(rollout.model, started.id)

    async def get(self, model: str, rollout_id: str) -> Rollout:
        async with self._database.transaction() as connection:
            return rollout_from_row(await self._row(connection, model, rollout_id))

    async def list(self, model: str, page_size: int, page_token: str) -> Page[Rollout]:
        cursor = PageCursor(
            page_size, page_token, json.dumps(["rollouts", model]), int, max_page_size=MAX_PAGE_SIZE
        )
        async with self._database.transaction() as connection:
            found = await connection.execute(
                _SELECT_ROLLOUT + " WHERE model = %(model)s AND (%(after)s::bigint IS NULL OR id < %(after)s)"
                " ORDER BY id DESC LIMIT %(limit)s",
                {"model": model, "after": cursor.after, "limit": cursor.limit + 1},
            )
            rows = await found.fetchall()
        if not rows and cursor.after is None:
            await self._registry.get_model(model)  # an unknown parent is NOT_FOUND, not an empty list
        page, token = cursor.page(rows, "id")
        return Page([rollout_from_row(row) for row in page], token)

    async def pause(self, model: str, rollout_id: str) -> Rollout:
        return await self._move(model, rollout_id, RolloutState.RUNNING, RolloutState.PAUSED)

    async def resume(self, model: str, rollout_id: str) -> Rollout:
        return await self._move(model, rollout_id, RolloutState.PAUSED, RolloutState.RUNNING)

    async def abort(self, model: str, rollout_id: str) -> Rollout:
        async with self._database.transaction() as connection:
            rollout = rollout_from_row(await self._row(connection, model, rollout_id, lock=True))
            if not rollout.state.active:
                raise FailedPrecondition(
                    f"rollout {rollout_id} of {model!r} is {rollout.state.value}; it ended"
                )
            await self._apply(rollout, 0)
            await self._end(connection, rollout, RolloutState.ABORTED, "aborted by hand")
        logger.info("rollout aborted", extra={"model": model, "rollout": rollout_id})
        return await self.get(model, rollout_id)

    async def _move(self, model: str, rollout_id: str, state: RolloutState, to: RolloutState) -> Rollout:
        async with self._database.transaction() as connection:
            rollout = rollout_from_row(await self._row(connection, model, rollout_id, lock=True))
            if rollout.state is not state:
                raise FailedPrecondition(
                    f"rollout {rollout_id} of {model!r} is {rollout.state.value}, not {state.value}"
                )
            # A resumed step is measured from now: what happened while paused is not its doing.
            await connection.execute(
                "UPDATE rollouts SET state = %(state)s, step_start_time = now(), reason = ''"
                " WHERE model = %(model)s AND id = %(id)s",
                {"state": to.value, "model": model, "id": int(rollout_id)},
            )
        return await self.get(model, rollout_id)

    async def _row(
        self, connection: Connection, model: str, rollout_id: str, *, lock: bool = False
    ) -> DictRow:
        query: LiteralString = _SELECT_ROLLOUT + " WHERE model = %(model)s AND id = %(id)s"
        cursor = await connection.execute(
            query + " FOR UPDATE" if lock else query,
            {"model": model, "id": int(rollout_id) if rollout_id.isdigit() else -1},
        )
        row = await cursor.fetchone()
        if row is None:
            raise NotFound(ROLLOUT, f"models/{model}/rollouts/{rollout_id}")
        return row

    async def _apply(self, rollout: Rollout, percent: int) -> None:
        deployment = await self._registry.get_deployment(rollout.model, rollout.deployment)
        traffic = split_at(deployment, rollout, percent)
        if traffic != deployment.traffic:
            await self._registry.update_deployment(replace(deployment, traffic=traffic, etag=""), ["traffic"])

    async def _end(self, connection: Connection, rollout: Rollout, state: RolloutState, reason: str) -> None:
        await connection.execute(
            "UPDATE rollouts SET state = %(state)s, reason = %(reason)s, end_time = now()"
            " WHERE model = %(model)s AND id = %(id)s",
            {"state": state.value, "reason": reason, "model": rollout.model, "id": int(rollout.id)},
        )

    async def report_traffic(self, router: str, reports: Sequence[VersionTraffic]) -> None:
        """Keep the figures of the versions of models under an active rollout; the rest are
        dropped here, so routers may report everything they answered."""
        check_traffic(reports)
        async with self._database.transaction() as connection:
            for report in reports:
                await connection.execute(
                    "INSERT INTO version_traffic (model, version, router, requests, server_errors,"
                    " latency_bounds, latency_counts, shadow_matches, shadow_mismatches)"
                    " SELECT %(model)s, %(version)s, %(router)s, %(requests)s, %(errors)s, %(bounds)s,"
                    " %(counts)s, %(matches)s, %(mismatches)s WHERE EXISTS (SELECT 1 FROM rollouts"
                    " WHERE model = %(model)s AND state IN ('RUNNING', 'PAUSED'))",
                    {
                        "model": report.model,
                        "version": report.version,
                        "router": router,
                        "requests": report.requests,
                        "errors": report.server_errors,
                        "bounds": list(report.latency_bounds),
                        "counts": list(report.latency_counts),
                        "matches": report.shadow_matches,
                        "mismatches": report.shadow_mismatches,
                    },
                )

    async def step_due(self, recheck: timedelta) -> bool:
        """Judge one running rollout whose step is due, if any, and act on the verdict;
        whether there was one. Replicas skip the rows another one holds; a step still waiting
        for answers is looked at again after `recheck`."""
        async with self._database.transaction() as connection:
            cursor = await connection.execute(
                _SELECT_ROLLOUT + " WHERE state = 'RUNNING' AND step_start_time + step_interval <= now()"
                " AND (last_judged IS NULL OR last_judged <= now() - %(recheck)s)"
                " ORDER BY step_start_time LIMIT 1 FOR UPDATE SKIP LOCKED",
                {"recheck": recheck},
            )
            row = await cursor.fetchone()
            if row is None:
                return False
            rollout = rollout_from_row(row)
            since = rollout.step_start_time
            new = await self._figures(connection, rollout.model, rollout.to_version, since)
            old = await self._figures(connection, rollout.model, rollout.from_version, since)
            verdict, reason = judge(rollout.bounds, new, old, rollout.to_version, rollout.from_version)
            await connection.execute(
                "UPDATE rollouts SET to_figures = %(new)s, from_figures = %(old)s, reason = %(reason)s,"
                " last_judged = now() WHERE model = %(model)s AND id = %(id)s",
                {
                    "new": _figures_json(new),
                    "old": _figures_json(old),
                    "reason": reason,
                    "model": rollout.model,
                    "id": int(rollout.id),
                },
            )
            if verdict is Verdict.WAIT:
                return True
            try:
                if verdict is Verdict.FAIL:
                    await self._apply(rollout, 0)
                    await self._end(connection, rollout, RolloutState.ROLLED_BACK, reason)
                    logger.warning(
                        "rollout rolled back",
                        extra={"model": rollout.model, "rollout": rollout.id, "reason": reason},
                    )
                    return True
                index = rollout.step_index + 1
                await self._apply(rollout, rollout.steps[index])
            except (NotFound, FailedPrecondition, InvalidArgument) as error:
                # The deployment went away or no longer takes the split: nothing left to roll.
                await self._end(connection, rollout, RolloutState.ABORTED, f"could not apply a step: {error}")
                return True
            done = rollout.steps[index] == 100
            await connection.execute(
                "UPDATE rollouts SET step_index = %(index)s, step_start_time = now(), state = %(state)s,"
                " end_time = CASE WHEN %(done)s THEN now() END, reason = %(reason)s"
                " WHERE model = %(model)s AND id = %(id)s",
                {
                    "index": index,
                    "state": (RolloutState.SUCCEEDED if done else RolloutState.RUNNING).value,
                    "done": done,
                    "reason": f"version {rollout.to_version} has all of the traffic" if done else "",
                    "model": rollout.model,
                    "id": int(rollout.id),
                },
            )
        return True

    async def _figures(
        self, connection: Connection, model: str, version: str, since: datetime | None
    ) -> Figures:
        cursor = await connection.execute(_FIGURES, {"model": model, "version": version, "since": since})
        row = await cursor.fetchone()
        assert row is not None
        return Figures(
            requests=int(row["requests"]),
            server_errors=int(row["server_errors"]),
            latency={float(bound): int(count) for bound, count in row["latency"]},
            shadow_compared=int(row["shadow_compared"]),
            shadow_mismatches=int(row["shadow_mismatches"]),
        )

    async def forget_old_traffic(self) -> None:
        """Drop the reports no active step will read again."""
        async with self._database.transaction() as connection:
            await connection.execute(
                "DELETE FROM version_traffic t WHERE NOT EXISTS (SELECT 1 FROM rollouts r"
                " WHERE r.model = t.model AND r.state IN ('RUNNING', 'PAUSED')"
                " AND r.step_start_time <= t.report_time)"
            )


class RolloutDriver:
    """Judges the due steps of every running rollout, every `tick`, for as long as it runs."""

    def __init__(self, rollouts: Rollouts, tick: timedelta) -> None:
        self._rollouts = rollouts
        self._tick = tick

    async def run(self) -> None:
        while True:
            try:
                while await self._rollouts.step_due(self._tick):
                    pass
                await self._rollouts.forget_old_traffic()
            except TensorwayError as error:
                # PostgreSQL is away: the steps stay due, and the next tick takes them.
                logger.warning("judging rollout steps failed: %s", error)
            await asyncio.sleep(self._tick.total_seconds())


# Protobuf conversion


def rollout_name(model: str, rollout_id: str) -> str:
    return f"models/{model}/rollouts/{rollout_id}"


def _figures_to_proto(figures: Figures) -> pb.RolloutFigures:
    return pb.RolloutFigures(
        requests=figures.requests,
        server_errors=figures.server_errors,
        p99_seconds=figures.p99(),
        shadow_compared=figures.shadow_compared,
        shadow_mismatches=figures.shadow_mismatches,
    )


def rollout_to_proto(rollout: Rollout) -> pb.Rollout:
    interval = Duration()
    interval.FromTimedelta(rollout.interval)
    bounds = rollout.bounds
    message = pb.Rollout(
        name=rollout_name(rollout.model, rollout.id),
        deployment=f"models/{rollout.model}/deployments/{rollout.deployment}",
        from_version=rollout.from_version,
        to_version=rollout.to_version,
        steps=list(rollout.steps),
        interval=interval,
        bounds=pb.RolloutBounds(
            max_error_rate=bounds.max_error_rate,
            max_p99_ratio=bounds.max_p99_ratio,
            max_mismatch_share=bounds.max_mismatch_share,
            min_requests=bounds.min_requests,
        ),
        state=pb.RolloutState.Value(f"ROLLOUT_STATE_{rollout.state.value}"),
        step_index=rollout.step_index,
        reason=rollout.reason,
        to_figures=_figures_to_proto(rollout.to_figures),
        from_figures=_figures_to_proto(rollout.from_figures),
    )
    for name, value in (
        ("create_time", rollout.create_time),
        ("step_start_time", rollout.step_start_time),
        ("end_time", rollout.end_time),
    ):
        if value is not None:
            getattr(message, name).FromDatetime(value)
    return message


def rollout_from_proto(message: pb.Rollout, model: str) -> Rollout:
    """The rollout a StartRollout asks for, with defaults where fields are unset."""
    deployment = ""
    if message.deployment:
        owner, deployment = validation.parse_name(
            message.deployment, "rollout.deployment", "models", "deployments"
        )
        if owner != model:
            raise InvalidArgument(
                "the deployment belongs to another model",
                [FieldViolation("rollout.deployment", f"of models/{model}")],
            )
    given = message.bounds
    defaults = RolloutBounds()
    bounds = RolloutBounds(
        max_error_rate=given.max_error_rate if given.HasField("max_error_rate") else defaults.max_error_rate,
        max_p99_ratio=given.max_p99_ratio if given.HasField("max_p99_ratio") else defaults.max_p99_ratio,
        max_mismatch_share=(
            given.max_mismatch_share if given.HasField("max_mismatch_share") else defaults.max_mismatch_share
        ),
        min_requests=given.min_requests if given.HasField("min_requests") else defaults.min_requests,
    )
    return Rollout(
        model=model,
        deployment=deployment,
        from_version=message.from_version,
        to_version=message.to_version,
        steps=tuple(message.steps) or DEFAULT_STEPS,
        interval=message.interval.ToTimedelta() if message.HasField("interval") else DEFAULT_INTERVAL,
        bounds=bounds,
    )


def traffic_from_proto(message: pb.ReportTrafficRequest) -> list[VersionTraffic]:
    return [
        VersionTraffic(
            model=item.model,
            version=item.version,
            requests=item.requests,
            server_errors=item.server_errors,
            latency_bounds=tuple(item.latency_bounds),
            latency_counts=tuple(item.latency_counts),
            shadow_matches=item.shadow_matches,
            shadow_mismatches=item.shadow_mismatches,
        )
        for item in message.versions
    ]
