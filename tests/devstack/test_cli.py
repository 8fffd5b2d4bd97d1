"""`tensorway dev up/status/down` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tensorway.cli.dev import dev_app


def test_up_status_down_round_trip(private_state_dir: Path) -> None:
    # Any context `dev up` writes goes to a config file of this test's own.
    runner = CliRunner(env={"TENSORWAY_CONFIG": str(private_state_dir / "config.yaml")})
    state_dir = ["--state-dir", str(private_state_dir)]

    started = runner.invoke(dev_app, ["up", "redis", "kafka", *state_dir])
    try:
        assert started.exit_code == 0, started.output
        # How long each component took, as it answered, and the whole start.
        assert "redis answered (its start took" in started.stderr
        assert "kafka answered (its start took" in started.stderr
        assert "up in " in started.stderr
        status = runner.invoke(dev_app, ["status", "--json", *state_dir])
        addresses = json.loads(status.stdout)
        assert addresses.keys() == {"redis", "kafka"}
        assert addresses["redis"] in started.stdout
        as_yaml = runner.invoke(dev_app, ["status", "-o", "yaml", *state_dir])
        assert yaml.safe_load(as_yaml.stdout) == addresses

        again = runner.invoke(dev_app, ["up", "redis", *state_dir])
        assert again.exit_code == 1
        assert "already running" in again.stderr
        assert "tensorway dev down" in again.stderr
    finally:
        stopped = runner.invoke(dev_app, ["down", *state_dir])
    assert stopped.exit_code == 0
    assert "stopped kafka, redis" in stopped.stdout
    assert json.loads(runner.invoke(dev_app, ["status", "--json", *state_dir]).stdout) == {}
    assert "nothing was running" in runner.invoke(dev_app, ["down", *state_dir]).stdout
