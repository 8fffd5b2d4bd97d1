"""Prometheus, scraping every service of the local stack: Debian's `prometheus` package.

Optional: `tensorway dev up --with-prometheus` (or `dev up prometheus`) starts it after the
rest, and it scrapes each component that recorded a metrics URL in the state file when it
started, as a job named after the component (the name the alert rules and dashboards in
docs/observability expect).
"""

from __future__ import annotations

import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tensorway.devstack._component import Component, LaunchContext, Started, http_ready, loopback
from tensorway.devstack._errors import DevStackError
from tensorway.devstack._settings import DevStackSettings
from tensorway.devstack._state import Endpoint, load_state

# The mesh's recording and alert rules, present in a source checkout (not in a wheel).
CHECKOUT_RULES = Path(__file__).resolve().parents[3] / "docs/observability/alerts/tensorway.rules.yml"


class Prometheus(Component):
    """Prometheus on loopback, scraping the stack's metrics endpoints and evaluating the mesh's rules."""

    name = "prometheus"
    port_settings = ("prometheus_port",)
    optional = True

    def __init__(self, rule_files: tuple[Path, ...] = (CHECKOUT_RULES,)) -> None:
        self._rule_files = rule_files

    def starts_after(self, starting: Collection[str]) -> set[str]:
        # It scrapes what the state file lists as it starts: everything else this launch starts.
        return set(starting) - {self.name}

    def start(self, ctx: LaunchContext) -> Started:
        binary = shutil.which("prometheus")
        if binary is None:
            raise DevStackError(
                self.name,
                "the prometheus binary is not on PATH",
                "install Debian's prometheus package: apt-get install prometheus",
            )
        port = ctx.port("prometheus_port")
        targets = {
            name: record.internal["metrics"]
            for name, record in load_state(ctx.state_dir).components.items()
            if "metrics" in record.internal
        }
        config = ctx.home / "prometheus.yml"
        rule_files = [path for path in self._rule_files if path.is_file()]
        config.write_text(yaml.safe_dump(scrape_config(targets, ctx.settings, rule_files), sort_keys=False))
        url = f"http://{loopback(port)}"
        process = ctx.spawn(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={ctx.home / 'data'}",
                "--storage.tsdb.retention.time=2d",
                f"--web.listen-address={loopback(port)}",
            ]
        )
        ctx.wait_ready(process, lambda: http_ready(f"{url}/-/ready", timeout=1), what="GET /-/ready")
        return Started(process=process, endpoints={"prometheus": Endpoint(address=loopback(port), url=url)})


def scrape_config(
    targets: Mapping[str, str], settings: DevStackSettings, rule_files: list[Path]
) -> dict[str, object]:
    """Prometheus's configuration: one job per component, named after it, scraping its metrics URL."""
    interval = f"{max(1, int(settings.prometheus_scrape_interval.total_seconds()))}s"
    jobs = []
    for name, metrics_url in targets.items():
        parts = urlsplit(metrics_url)
        jobs.append(
            {
                "job_name": name,
                "scheme": parts.scheme or "http",
                "metrics_path": parts.path or "/metrics",
                "static_configs": [{"targets": [parts.netloc]}],
            }
        )
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": jobs,
    }
