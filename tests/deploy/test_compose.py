"""docker-compose.yml is a valid Compose file, starts in dependency order with health checks,
runs every tensorway service with real settings, and publishes nothing beyond loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tensorway.cli.main import SERVICES

from .manifests import ROOT, cli_environment_variables, unknown_settings

# The Compose Specification's JSON schema (github.com/compose-spec/compose-spec,
# schema/compose-spec.json, Apache-2.0, license beside it), as check-jsonschema 0.39.0 vendors
# it. No PyPI package ships it without pulling in a conflicting click, and Docker is not needed.
SCHEMA = Path(__file__).with_name("schemas") / "compose-spec.json"
# Servers whose images have no shell or client to run a check with; nothing waits on them.
NO_HEALTHCHECK = {"otel-collector", "jaeger"}
ONE_SHOT = {"demo-setup", "jwt-keys", "edge-tls"}


def tensorway_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compose services that run `tensorway serve X`, by X."""
    found = {}
    for service in compose["services"].values():
        command = service.get("command") or []
        if service.get("build", {}).get("target") == "runtime" and command[:1] == ["serve"]:
            found[command[1]] = service
    return found


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)


def test_the_schema_check_catches_mistakes(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["router"]["depends_on"]["registry"]["condition"] = "service_ready"
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(broken))


def test_every_tensorway_service_runs(compose: dict[str, Any]) -> None:
    assert set(tensorway_services(compose)) == set(SERVICES)


def test_tensorway_variables_are_settings_fields(compose: dict[str, Any]) -> None:
    for service, spec in tensorway_services(compose).items():
        names = set(spec["environment"])
        assert not unknown_settings(service, names), f"{service}: {unknown_settings(service, names)}"
        # Inside a container the default 127.0.0.1 would be unreachable.
        prefix = f"TENSORWAY_{service.upper().replace('-', '_')}_"
        assert spec["environment"][f"{prefix}HOST"] == "0.0.0.0"


def test_the_cli_container_reads_real_cli_variables(compose: dict[str, Any]) -> None:
    names = set(compose["services"]["cli"]["environment"])
    assert names <= cli_environment_variables()


def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in NO_HEALTHCHECK | ONE_SHOT or "tools" in service.get("profiles", []):
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_tensorway_health_checks_ask_grpc_health_on_the_served_port(compose: dict[str, Any]) -> None:
    for service, spec in tensorway_services(compose).items():
        prefix = f"TENSORWAY_{service.upper().replace('-', '_')}_"
        port = spec["environment"][f"{prefix}PORT"]
        assert spec["healthcheck"]["test"][-1] == f"127.0.0.1:{port}", service


def test_dependencies_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if dependency in ONE_SHOT:
                expected = "service_completed_successfully"
            elif dependency in NO_HEALTHCHECK:
                expected = "service_started"
            else:
                expected = "service_healthy"
            assert condition["condition"] == expected, f"{name} → {dependency}"


def test_start_order_has_no_cycle(compose: dict[str, Any]) -> None:
    services = compose["services"]
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(name: str) -> None:
        assert name not in visiting, f"dependency cycle through {name}"
        if name in done:
            return
        visiting.add(name)
        for dependency in services[name].get("depends_on", {}):
            visit(dependency)
        visiting.discard(name)
        done.add(name)

    for name in services:
        visit(name)


def test_only_loopback_is_published(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_tensorway_containers_are_hardened(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if service.get("build", {}).get("target") != "runtime":
            continue
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


@pytest.mark.parametrize("service", ["envoy", "otel-collector", "prometheus", "grafana", "router"])
def test_mounted_files_exist(compose: dict[str, Any], service: str) -> None:
    for volume in compose["services"][service].get("volumes", []):
        source = volume.split(":", 1)[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"{service} mounts missing {source}"
