"""Settings for the private stacks the launcher tests start and stop themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorway.devstack import DevStackSettings


@pytest.fixture
def settings(private_state_dir: Path) -> DevStackSettings:
    return DevStackSettings(state_dir=private_state_dir).without_pinned_ports()
