"""Alert rules pass promtool's checks and unit tests; rules and dashboards read only catalogued series."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .catalogue import OBSERVABILITY, CatalogueEntry, queried_series

RULES = sorted((OBSERVABILITY / "alerts").glob("*.rules.yml"))
RULE_TESTS = sorted((OBSERVABILITY / "alerts" / "tests").glob("*.test.yml"))
DASHBOARDS = sorted((OBSERVABILITY / "dashboards").glob("*.json"))


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _rules() -> list[dict[str, Any]]:
    groups = [group for path in RULES for group in yaml.safe_load(path.read_text())["groups"]]
    return [rule for group in groups for rule in group["rules"]]


def _panel_expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_promtool_accepts_the_rules(promtool: str) -> None:
    assert RULES
    _run([promtool, "check", "rules", *map(str, RULES)])


def test_rule_unit_tests_pass(promtool: str) -> None:
    assert RULE_TESTS
    _run([promtool, "test", "rules", *map(str, RULE_TESTS)])


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert alerts - tested == set(), "alerts no unit test sees firing"


def test_rules_read_only_catalogued_series(catalogue: dict[str, CatalogueEntry]) -> None:
    used = set().union(*(queried_series(rule["expr"], catalogue) for rule in _rules()))
    assert used - catalogue.keys() == set(), "series missing from docs/metrics.md"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: Path(path).stem)
def test_dashboard_reads_only_catalogued_series(path: Path, catalogue: dict[str, CatalogueEntry]) -> None:
    dashboard = json.loads(path.read_text())
    expressions = _panel_expressions(dashboard)
    assert expressions
    used = set().union(*(queried_series(expr, catalogue) for expr in expressions))
    assert used - catalogue.keys() == set(), "series missing from docs/metrics.md"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # Queries go to whichever Prometheus the importer picks, never to one fixed datasource.
    queried = [panel for panel in dashboard["panels"] if "targets" in panel]
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in queried)


def test_dashboards_have_distinct_uids() -> None:
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids)) == 3
