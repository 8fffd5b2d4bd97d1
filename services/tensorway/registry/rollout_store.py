"""Rollouts in PostgreSQL: starting, reading, pausing, resuming and aborting them, the routers'
traffic reports, and judging the steps that are due (`Rollouts.step_due`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, LiteralString, Protocol

from psycopg import errors
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from tensorway.registry.domain import MODEL, Deployment, Model, Page
from tensorway.registry.rollout_domain import (
    ROLLOUT,
    Rollout,
    RolloutState,
    VersionTraffic,
    check_rollout,
    check_traffic,
    split_at,
)
from tensorway.registry.rollout_judging import Figures, RolloutBounds, Verdict, judge
from tensorway.registry.rows import MAX_PAGE_SIZE, Rows
from tensorway.registry.store import open_database
from tensorway.runtime import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, TensorwayError
from tensorway.runtime.postgres import Connection, Database, PageCursor

logger = logging.getLogger(__name__)


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


def _figures_from_json(data: Mapping[str, Any] | None) -> Figures:
    return Figures.from_summary(data) if data else Figures()


# The rollout's columns that hold its fields as they are.
_PLAIN_COLUMNS = (
    "model",
    "deployment",
    "from_version",
    "to_version",
    "step_index",
    "reason",
    "create_time",
    "step_start_time",
    "end_time",
)


def rollout_from_row(row: Mapping[str, Any]) -> Rollout:
    return Rollout(
        **{column: row[column] for column in _PLAIN_COLUMNS},
        id=str(row["id"]),
        steps=tuple(row["steps"]),
        interval=timedelta(seconds=float(row["interval_seconds"])),
        bounds=RolloutBounds(**row["bounds"]),
        state=RolloutState(row["state"]),
        to_figures=_figures_from_json(row["to_figures"]),
        from_figures=_figures_from_json(row["from_figures"]),
    )


class Rollouts(Rows):
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

    def _connection(self) -> AbstractAsyncContextManager[Connection]:
        return self._database.connection()

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
        return await self._page(
            _SELECT_ROLLOUT + " WHERE model = %(model)s AND (%(after)s::bigint IS NULL OR id < %(after)s)"
            " ORDER BY id DESC LIMIT %(limit)s",
            {"model": model},
            cursor,
            key="id",
            from_row=rollout_from_row,
            parent=lambda: self._registry.get_model(model),
        )

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
                    "new": Jsonb(new.summary()),
                    "old": Jsonb(old.summary()),
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
