"""The fuzz suite's hypothesis settings: a fixed, seeded budget in CI, a longer campaign on demand.

CI (the default) runs each test for its own `max_examples` from a fixed seed, after replaying the
examples committed in `examples/` (a DirectoryBasedExampleDatabase that CI only reads), so every
run tries the same inputs. A campaign explores from a random seed with many more examples and
saves every failing example it finds into `examples/`, to be committed with its fix:

    TENSORWAY_FUZZ_PROFILE=campaign TENSORWAY_FUZZ_SCALE=50 .venv/bin/pytest tests/fuzz
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, seed, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

EXAMPLES = Path(__file__).parent / "examples"
PROFILE_VARIABLE = "TENSORWAY_FUZZ_PROFILE"
SCALE_VARIABLE = "TENSORWAY_FUZZ_SCALE"
CI_SEED = 20261122


class KeepingDatabase(DirectoryBasedExampleDatabase):
    """The seed database as a campaign writes it: new failing examples are added, none removed.

    Hypothesis deletes a saved example once it passes, which after a fix is every seed this
    folder keeps; a campaign run after the fixes must not take the regressions out of CI.
    """

    def delete(self, key: bytes, value: bytes) -> None:
        pass

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.save(dest, value)


settings.register_profile(
    "fuzz-ci",
    deadline=None,
    database=ReadOnlyDatabase(DirectoryBasedExampleDatabase(EXAMPLES)),
    # Servers are session fixtures; a slow or large example is the point, not a smell.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile(
    "fuzz-campaign",
    parent=settings.get_profile("fuzz-ci"),
    database=KeepingDatabase(EXAMPLES),
)

Test = TypeVar("Test", bound=Callable[..., Any])


def campaign() -> bool:
    """Whether this run is a campaign rather than CI's fixed budget."""
    return os.environ.get(PROFILE_VARIABLE, "ci") == "campaign"


def fuzz_budget(max_examples: int) -> Callable[[Test], Test]:
    """Settings for one fuzz test: `max_examples` in CI from a fixed seed; in a campaign that many
    times TENSORWAY_FUZZ_SCALE (default 20), from a random seed."""

    def apply(test: Test) -> Test:
        if campaign():
            scale = int(os.environ.get(SCALE_VARIABLE, "20"))
            return settings(settings.get_profile("fuzz-campaign"), max_examples=max_examples * scale)(test)
        # @seed alone would also drop the database; the settings applied over it keep the seed
        # database that CI replays first.
        seeded = seed(CI_SEED)(test)
        return settings(settings.get_profile("fuzz-ci"), max_examples=max_examples)(seeded)

    return apply
