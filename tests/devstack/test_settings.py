"""Settings come from the environment under their prefixes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from tensorway.devstack import DevStackSettings, ServiceEndpoints


def test_dev_settings_read_the_tensorway_dev_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORWAY_DEV_STATE_DIR", "/srv/stack")
    monkeypatch.setenv("TENSORWAY_DEV_START_TIMEOUT", "12")
    monkeypatch.setenv("TENSORWAY_DEV_REDIS_PORT", "6390")
    settings = DevStackSettings()
    assert settings.state_dir == Path("/srv/stack")
    assert settings.start_timeout == timedelta(seconds=12)
    assert settings.redis_port == 6390
    assert settings.without_pinned_ports().redis_port is None
    assert settings.without_pinned_ports().start_timeout == timedelta(seconds=12)


def test_service_endpoints_read_the_compose_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORWAY_POSTGRES_URL", "postgresql://postgres@db:5432/tensorway")
    monkeypatch.setenv("TENSORWAY_TRITON_GRPC", "triton:8001")
    endpoints = ServiceEndpoints()
    assert endpoints.postgres_url == "postgresql://postgres@db:5432/tensorway"
    assert endpoints.triton_grpc == "triton:8001"
    assert endpoints.redis_url is None
