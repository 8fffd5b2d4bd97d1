"""The loop every registry replica runs to judge the rollout steps that are due."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from tensorway.registry.rollout_store import Rollouts
from tensorway.runtime import TensorwayError

logger = logging.getLogger(__name__)


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
