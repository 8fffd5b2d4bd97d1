"""Judging a rollout's step from traffic figures: how far the new version may fall behind the
old one (`RolloutBounds`), what the routers measured of each (`Figures`), and the verdict."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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

    def summary(self) -> dict[str, Any]:
        """What is kept and shown of the figures a step was judged by: the counts, and the
        latency only as its p99."""
        return {
            "requests": self.requests,
            "server_errors": self.server_errors,
            "p99_seconds": self.p99(),
            "shadow_compared": self.shadow_compared,
            "shadow_mismatches": self.shadow_mismatches,
        }

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> Figures:
        """Figures again from their `summary`, the p99 as a one-bucket histogram."""
        counts = {name: value for name, value in summary.items() if name != "p99_seconds"}
        return cls(**counts, latency={float(summary["p99_seconds"]): 1} if summary["requests"] else {})

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
