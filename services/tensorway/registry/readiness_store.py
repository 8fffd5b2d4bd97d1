"""What each pool's orchestrators report of their model versions' readiness, in PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence

from tensorway.registry.domain import ModelStateReport
from tensorway.registry.pool_store import PoolWrites


class ReadinessWrites(PoolWrites):
    """Readiness reports inside a write transaction; a report is made under its pool's lock."""

    async def replace_model_states(
        self, pool: str, endpoint: str, reports: Sequence[ModelStateReport]
    ) -> set[str]:
        """Make `reports` the whole of what `endpoint` of `pool` reports; returns the models
        whose states changed (a report that changes nothing writes nothing)."""
        await self.get_pool(pool, share_lock=True)
        rows = await self._all(
            "SELECT model, version, triton, state, reason FROM model_version_states"
            " WHERE pool = %(pool)s AND endpoint = %(endpoint)s FOR UPDATE",
            {"pool": pool, "endpoint": endpoint},
        )
        reporter = await self._one(
            "SELECT 1 AS known FROM model_state_reporters WHERE pool = %(pool)s AND endpoint = %(endpoint)s",
            {"pool": pool, "endpoint": endpoint},
        )
        old = {(r["model"], r["version"], r["triton"]): (r["state"], r["reason"]) for r in rows}
        new = {(r.model, r.version, r.triton): (r.state.value, r.reason) for r in reports}
        if reporter is not None and old == new:
            return set()
        await self._execute(
            "INSERT INTO model_state_reporters (pool, endpoint) VALUES (%(pool)s, %(endpoint)s)"
            " ON CONFLICT (pool, endpoint) DO UPDATE SET update_time = now()",
            {"pool": pool, "endpoint": endpoint},
        )
        await self._execute(
            "DELETE FROM model_version_states WHERE pool = %(pool)s AND endpoint = %(endpoint)s",
            {"pool": pool, "endpoint": endpoint},
        )
        for (model, version, triton), (state, reason) in new.items():
            await self._execute(
                "INSERT INTO model_version_states (pool, endpoint, model, version, triton, state, reason)"
                " VALUES (%(pool)s, %(endpoint)s, %(model)s, %(version)s, %(triton)s, %(state)s, %(reason)s)",
                {
                    "pool": pool,
                    "endpoint": endpoint,
                    "model": model,
                    "version": version,
                    "triton": triton,
                    "state": state,
                    "reason": reason,
                },
            )
        if reporter is None:
            # The pool starts reporting: every model it serves is now gated by readiness.
            return set(await self.models_on_pool(pool)) | {key[0] for key in new}
        return {key[0] for key in old.keys() ^ new.keys()} | {
            key[0] for key in old.keys() & new.keys() if old[key] != new[key]
        }
