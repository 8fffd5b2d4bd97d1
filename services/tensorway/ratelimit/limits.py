"""The global limits the routers enforce (see `tensorway.ratelimit.leases`), read from a YAML file.

A limit names the descriptor entries it applies to. A request is counted under descriptors such
as ``[tenant=acme]``, ``[tenant=acme, rows=64]`` or ``[model=digits]``, its cost computed by the
router from its tensors. An entry ``rows`` or ``bytes``
is the request's cost, not a key to match: it makes the descriptor count that many hits against
a limit whose ``cost`` it names. A limit applies to a descriptor whose other keys are exactly
the limit's keys. A value ``"*"`` gives every value its own counter; a literal value is more
specific and wins over ``"*"`` (a bigger quota for one tenant, say).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

ANY = "*"


class Cost(enum.StrEnum):
    """What a hit counts: requests, or the rows or bytes of the request's tensors."""

    REQUESTS = "requests"
    ROWS = "rows"
    BYTES = "bytes"


COST_KEYS = {Cost.ROWS.value, Cost.BYTES.value}
"""Descriptor entries whose value is the request's cost in that unit."""


@dataclass(frozen=True)
class Counted:
    """A descriptor read against the limits: what it matches on, its cost and its hits."""

    entries: tuple[tuple[str, str], ...]
    """The entries to match and count under, without the cost entry."""
    cost: Cost
    hits: int


def read_descriptor(entries: Sequence[tuple[str, str]], hits: int) -> Counted | None:
    """Split a descriptor's cost entry from its match entries; None when it cannot be counted.

    ``hits`` is what the descriptor costs when it has no cost entry (1 for a request).
    """
    if any(not value for _, value in entries):
        return None  # a blank value would share one counter among everything that lacks it
    costs = [(key, value) for key, value in entries if key in COST_KEYS]
    rest = tuple((key, value) for key, value in entries if key not in COST_KEYS)
    if not costs:
        return Counted(rest, Cost.REQUESTS, hits)
    if len(costs) > 1 or not costs[0][1].isdigit():
        return None
    key, value = costs[0]
    return Counted(rest, Cost(key), int(value))


class Window(enum.StrEnum):
    """The fixed window a limit counts in."""

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
    """What a limit answers while Redis is unreachable."""

    OPEN = "open"
    """Let requests through: availability over enforcement."""
    CLOSED = "closed"
    """Reject requests as over limit until Redis is back."""


class Limit(BaseModel):
    """One limit: at most ``limit`` cost units per ``per`` for each descriptor it matches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    """Identifies the limit in counters, logs and the ErrorInfo of the requests it refuses."""
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
    def _costs_are_not_match_keys(cls, match: dict[str, str]) -> dict[str, str]:
        costs = sorted(set(match) & COST_KEYS)
        if costs:
            raise ValueError(
                f"{', '.join(costs)} carry a request's cost; say what a limit counts with `cost:`"
            )
        return match

    def specificity(self) -> int:
        """How many entries the limit pins to a literal value; the most specific limit applies."""
        return sum(value != ANY for value in self.match.values())


class LimitsFile(BaseModel):
    """The YAML file: the domain, the Redis failure mode and the limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str = "tensorway"
    """Namespaces the Redis counters, so two meshes may share one Redis."""
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

    def find(self, counted: Counted) -> Limit | None:
        """The most specific limit for a descriptor, or None when none applies."""
        values: Mapping[str, str] = dict(counted.entries)
        best: Limit | None = None
        for limit in self.limits:
            if set(limit.match) != set(values) or limit.cost != counted.cost:
                continue
            if all(want in (ANY, values[key]) for key, want in limit.match.items()) and (
                best is None or limit.specificity() > best.specificity()
            ):
                best = limit
        return best
