"""The limits the ratelimit service enforces, read from a YAML file.

A limit names the descriptor entries it applies to. Envoy sends descriptors such as
``[tenant=acme]``, ``[tenant=acme, cost=rows]`` (with the request's row count as its hits) or
``[model=digits]``; a limit applies to a descriptor whose keys are exactly the limit's keys plus,
for cost-counted limits, ``cost``. A value ``"*"`` gives every value its own counter; a literal
value is more specific and wins over ``"*"`` (a bigger quota for one tenant, say).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

ANY = "*"
COST_KEY = "cost"


class Cost(enum.StrEnum):
    """What a hit counts: requests, or the rows or bytes the request declares."""

    REQUESTS = "requests"
    ROWS = "rows"
    BYTES = "bytes"


class Window(enum.StrEnum):
    """The fixed window a limit counts in; the names are Envoy's rate limit units."""

    SECOND = "second"
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"

    @property
    def length(self) -> timedelta:
        return {
            Window.SECOND: timedelta(seconds=1),
            Window.MINUTE: timedelta(minutes=1),
            Window.HOUR: timedelta(hours=1),
            Window.DAY: timedelta(days=1),
        }[self]


class RedisFailure(enum.StrEnum):
    """What the service answers while Redis is unreachable."""

    OPEN = "open"
    """Let requests through: availability over enforcement."""
    CLOSED = "closed"
    """Reject requests as over limit until Redis is back."""


class Limit(BaseModel):
    """One limit: at most ``limit`` cost units per ``per`` for each descriptor it matches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    """Identifies the limit in counters, logs and the x-ratelimit-limit policy."""
    match: dict[str, str] = Field(min_length=1)
    """Descriptor entries the limit applies to; a value of "*" matches any value."""
    cost: Cost = Cost.REQUESTS
    """What one request adds to the counter."""
    limit: int = Field(gt=0)
    """Units allowed per window."""
    per: Window
    """The window."""

    @field_validator("match")
    @classmethod
    def _cost_is_not_a_match_key(cls, match: dict[str, str]) -> dict[str, str]:
        if COST_KEY in match:
            raise ValueError(f"say what a hit counts with `cost:`, not as a `{COST_KEY}` match entry")
        return match

    def specificity(self) -> int:
        """How many entries the limit pins to a literal value; the most specific limit applies."""
        return sum(value != ANY for value in self.match.values())


class LimitsFile(BaseModel):
    """The YAML file: the domain, the Redis failure mode and the limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str = "tensorway"
    """The rate limit domain Envoy's filter sends; requests of other domains are not limited."""
    redis_failure: RedisFailure = RedisFailure.OPEN
    """What to answer while Redis is down."""
    limits: list[Limit] = Field(default_factory=list)

    @field_validator("limits")
    @classmethod
    def _names_are_unique(cls, limits: list[Limit]) -> list[Limit]:
        names = [limit.name for limit in limits]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"limit names must be unique: {', '.join(duplicates)}")
        return limits

    @classmethod
    def load(cls, path: Path) -> LimitsFile:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})

    def find(self, entries: Sequence[tuple[str, str]]) -> Limit | None:
        """The most specific limit for a descriptor's entries, or None when none applies."""
        values: Mapping[str, str] = dict(entries)
        cost = Cost(values[COST_KEY]) if values.get(COST_KEY) in set(Cost) else None
        keys = set(values) - {COST_KEY}
        if COST_KEY in values and cost is None:
            return None
        best: Limit | None = None
        for limit in self.limits:
            if set(limit.match) != keys or limit.cost != (cost or Cost.REQUESTS):
                continue
            if all(want in (ANY, values[key]) for key, want in limit.match.items()) and (
                best is None or limit.specificity() > best.specificity()
            ):
                best = limit
        return best
