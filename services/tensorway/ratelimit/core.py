"""What a request asks of the limits and what they answer: descriptors, a status per descriptor and
the request's decision, and the Redis key a limit's window is counted under."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from tensorway.ratelimit.limits import Limit

PREFIX = "tensorway:ratelimit:"


@dataclass(frozen=True)
class Descriptor:
    """What one limit is asked about: entries such as ``(("tenant", "acme"), ("rows", "6"))``, and
    the hits the request adds (1 unless a cost entry among the entries says otherwise)."""

    entries: tuple[tuple[str, str], ...]
    hits: int = 1


@dataclass(frozen=True)
class Status:
    """The outcome for one descriptor; ``limit`` is None when no limit applies to it."""

    over_limit: bool
    limit: Limit | None = None
    remaining: int = 0
    """What this replica may still spend of the limit's window without asking Redis."""
    reset_in: timedelta = timedelta(0)


@dataclass(frozen=True)
class Decision:
    """The outcome for a request: one status per descriptor, in the request's order."""

    statuses: list[Status]
    retry_after: timedelta | None
    """Set when the request is refused: how long until every window that blocks it has ended."""
    redis_down: bool = False
    """Refused because a fail-closed limit could not be checked while Redis is down."""

    @property
    def over_limit(self) -> bool:
        return self.retry_after is not None

    @property
    def refused_by(self) -> Limit | None:
        """The first limit that refused the request; None when none did."""
        return next((s.limit for s in self.statuses if s.over_limit and s.limit is not None), None)


def window_key(domain: str, limit: Limit, entries: tuple[tuple[str, str], ...], index: int) -> str:
    """The Redis key of one window of a limit for the values it counts, shared by every replica."""
    return f"{PREFIX}{domain}:{limit.name}:{counter_key(entries)}:{index}"


def counter_key(entries: tuple[tuple[str, str], ...]) -> str:
    """The part of a key naming the values counted, e.g. ``tenant=acme``."""
    # Values come from requests; escaping the separators keeps two descriptors from sharing a key.
    return ",".join(f"{_escape(key)}={_escape(value)}" for key, value in entries)


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace(",", "%2C").replace("=", "%3D").replace(":", "%3A")
