"""Structural checks of the provisioned Grafana dashboards and data sources (no Grafana server runs here). The line
dashboard's PromQL is evaluated through a real Prometheus by test_live_metrics.py; the Plant dashboard's SQL is checked
here against the central schema's migrations and run on a real PostgreSQL by test_plant_database.py."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests.deploy.stack import (
    DASHBOARD,
    DASHBOARDS,
    DATASOURCES,
    GRAFANA_MACROS,
    PLANT_DASHBOARD,
    PLANT_DATASOURCE,
    SQL_MACROS,
    central_checks,
    central_schema,
    contract_metrics,
    dashboard_panels,
    dashboard_queries,
    load_dashboard,
    load_yaml,
    metric_names,
    plant_queries,
    recording_rules,
    rule_groups,
    sql_tables,
    sql_unknown_names,
)

PLANT_UID = "aoi-plant-postgres"
PLANT_TYPE = "grafana-postgresql-datasource"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


@pytest.fixture(scope="module")
def plant() -> dict:
    return load_dashboard(PLANT_DASHBOARD)


def _provisioned_uid() -> str:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    return source["uid"]


def test_two_dashboards_are_shipped_with_stable_uids(dashboard: dict, plant: dict) -> None:
    """The line dashboard (Prometheus, Grafana's home page) and the Plant dashboard (the central PostgreSQL)."""
    assert sorted(p.name for p in DASHBOARDS.iterdir()) == sorted([DASHBOARD.name, PLANT_DASHBOARD.name])
    assert dashboard["uid"] == "aoi-inspect"
    assert dashboard["title"]
    assert plant["uid"] == "aoi-plant"
    assert plant["title"] == "Plant"


def test_two_datasources_are_provisioned_with_stable_uids() -> None:
    """One file each, one data source per file; Prometheus stays the default (the line dashboard's)."""
    assert sorted(p.name for p in DATASOURCES.parent.iterdir()) == sorted([DATASOURCES.name, PLANT_DATASOURCE.name])
    (prometheus,) = load_yaml(DATASOURCES)["datasources"]
    (postgres,) = load_yaml(PLANT_DATASOURCE)["datasources"]
    assert (prometheus["uid"], prometheus["type"], prometheus["isDefault"]) == ("aoi-prometheus", "prometheus", True)
    assert (postgres["uid"], postgres["type"]) == (PLANT_UID, PLANT_TYPE)
    assert postgres.get("isDefault", False) is False
    assert postgres["editable"] is False
    assert prometheus["name"] != postgres["name"]


def test_plant_datasource_credentials_come_from_the_environment() -> None:
    """No secret in the repository: host, database, user and password are Grafana environment lookups (filled in by
    the grafana service's environment, test_compose.py), and the password only in secureJsonData."""
    (source,) = load_yaml(PLANT_DATASOURCE)["datasources"]
    lookups = {
        "url": source["url"],
        "user": source["user"],
        "database": source["jsonData"]["database"],
        "sslmode": source["jsonData"]["sslmode"],
        "password": source["secureJsonData"]["password"],
    }
    for key, value in lookups.items():
        assert re.fullmatch(r"\$\{GRAFANA_PLANT_PG_[A-Z]+\}", value), f"{key}: {value!r} is not an environment lookup"
    assert set(source["secureJsonData"]) == {"password"}
    assert not {"password", "basicAuthPassword", "database"} & set(source), "credentials outside secureJsonData"


def test_every_panel_uses_the_provisioned_datasource(dashboard: dict) -> None:
    uid = _provisioned_uid()
    for panel in dashboard_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, (panel["title"], target["refId"])


def test_every_panel_has_a_query(dashboard: dict) -> None:
    panels = dashboard_panels(dashboard)
    assert len(panels) >= 15
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} target {target['refId']} has an empty query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]


def test_queries_are_the_ones_the_live_test_evaluates(dashboard: dict) -> None:
    """dashboard_queries() is what test_live_metrics.py sends to Prometheus: it must cover every target of every panel,
    and the only Grafana syntax inside the queries is the macro set the live test substitutes."""
    every_target = [(p["title"], t["refId"]) for p in dashboard_panels(dashboard) for t in p["targets"]]
    assert [(q.panel, q.ref_id) for q in dashboard_queries(dashboard)] == every_target
    for query in dashboard_queries(dashboard):
        assert "$" not in query.promql(), f"{query.panel}: unknown Grafana variable in {query.expr!r}"
        assert set(re.findall(r"\$\w+", query.expr)) <= set(GRAFANA_MACROS)


def test_queries_name_only_contract_metrics_and_recording_rules(dashboard: dict) -> None:
    contract = contract_metrics()
    allowed = set(recording_rules()) | {"up", "ALERTS"}
    for name, kind in contract.items():
        allowed |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    for query in dashboard_queries(dashboard):
        unknown = metric_names(query.expr) - allowed
        assert not unknown, f"{query.panel}: {sorted(unknown)} is neither in docs/CONTRACTS.md nor a recording rule"


def test_dashboard_covers_every_contract_metric(dashboard: dict) -> None:
    """Every metric of the service contract is on the dashboard, directly or through a recording rule."""
    rule_exprs = {r["record"]: r["expr"] for g in rule_groups() for r in g["rules"] if "record" in r}
    shown: set[str] = set()
    for query in dashboard_queries(dashboard):
        for name in metric_names(query.expr):
            shown |= metric_names(rule_exprs[name]) if name in rule_exprs else {name}
    for metric in contract_metrics():
        assert any(s == metric or re.fullmatch(rf"{metric}_(bucket|sum|count)", s) for s in shown), metric


def test_panels_the_line_needs_are_there(dashboard: dict) -> None:
    text = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard_panels(dashboard)}
    needs = {
        "throughput": "aoi_images_processed_total",
        "request rate": "aoi_request_duration_seconds_count",
        "end-to-end p99": 'route:aoi_request_duration_seconds:p99_1m{route="/v1/inspect"}',
        "stage p50": "stage:aoi_stage_duration_seconds:p50_1m",
        "stage p95": "stage:aoi_stage_duration_seconds:p95_1m",
        "stage p99": "stage:aoi_stage_duration_seconds:p99_1m",
        "batch size": "aoi_batch_size_bucket",
        "queue depth": "aoi_queue_depth",
        "in flight": "aoi_inflight_requests",
        "rejected": "aoi_requests_rejected_total",
        "timed out": "aoi_requests_timed_out_total",
        "failed": "aoi_requests_failed_total",
        "NG rate": "aoi:ng_ratio:rate30m",
        "class drift": "class_name:aoi_detections_per_image:rate30m",
        "model info": "aoi_model_info",
        "ready": "aoi_ready",
        "up": 'up{job="aoi-inspect"}',
    }
    for need, expr in needs.items():
        assert any(expr in e for e in text.values()), f"no panel shows {need} ({expr})"


def _row(dashboard: dict, title: str) -> list[dict]:
    """The panels under row ``title`` (an expanded row: the panels between it and the next row, by position)."""
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in dashboard["panels"] if p["type"] == "row")
    (start,) = [y for y, t in rows if t == title]
    end = min((y for y, _ in rows if y > start), default=10**9)
    return [p for p in dashboard["panels"] if p["type"] != "row" and start < p["gridPos"]["y"] < end]


def test_plant_forwarding_row(dashboard: dict) -> None:
    """The station's forwarder to the central PostgreSQL: one row with backlog, age of the oldest record, records
    and batches per second, failures by reason and the connection, and the alert's 10-minute line on the age."""
    text = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in _row(dashboard, "Plant forwarding")}
    needs = {
        "backlog": "aoi_forward_backlog_records",
        "oldest unforwarded": "aoi_forward_oldest_unforwarded_seconds",
        "records/s": "rate(aoi_forward_records_total[$__rate_interval])",
        "batches/s": "rate(aoi_forward_batches_total[$__rate_interval])",
        "failures by reason": "sum by (reason) (rate(aoi_forward_failures_total[$__rate_interval]))",
        "connected": "aoi_forward_connected",
        "images pending": "aoi_forward_images_pending",
        "image bytes pending": "aoi_forward_images_pending_bytes",
        "image uploads by result": "sum by (result) (rate(aoi_forward_images_total[$__rate_interval]))",
    }
    for need, expr in needs.items():
        assert any(expr in e for e in text.values()), f"the Plant forwarding row has no {need} panel ({expr})"
    (oldest,) = [p for p in _row(dashboard, "Plant forwarding") if "oldest_unforwarded" in p["targets"][0]["expr"]]
    assert oldest["fieldConfig"]["defaults"]["unit"] == "s"
    steps = oldest["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps if s["color"] == "red"] == [600]  # AOIForwardBacklogOld's threshold


# --- the Plant dashboard (SQL on the central PostgreSQL) --------------------------------------------------------------


def test_every_plant_panel_uses_the_plant_datasource(plant: dict) -> None:
    expected = {"type": PLANT_TYPE, "uid": PLANT_UID}
    (source,) = load_yaml(PLANT_DATASOURCE)["datasources"]
    assert {"type": source["type"], "uid": source["uid"]} == expected
    panels = dashboard_panels(plant)
    assert len(panels) >= 4
    for panel in panels:
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == expected, (panel["title"], target["refId"])


def test_plant_queries_are_raw_sql_bounded_by_the_time_range(plant: dict) -> None:
    """Code-mode SQL (what the tests read is what Grafana runs), every query limited to the panel's time range on the
    indexed received_at (no whole-table scans of the plant's records), only the macros the tests expand, and time
    series with their time column first and rows in time order, as Grafana needs them."""
    queries = plant_queries(plant)
    assert [(q.panel, q.ref_id) for q in queries] == [
        (p["title"], t["refId"]) for p in dashboard_panels(plant) for t in p["targets"]
    ]
    for panel in dashboard_panels(plant):
        for target in panel["targets"]:
            assert target["rawQuery"] is True and target["editorMode"] == "code", panel["title"]
            assert target["format"] in {"time_series", "table"}, panel["title"]
    for query in queries:
        assert "$__timeFilter(received_at)" in query.sql, query.panel
        assert set(re.findall(r"\$\w+", query.sql)) <= set(SQL_MACROS), query.panel
        if query.format == "time_series":
            assert re.match(r"SELECT\s+\$__timeGroupAlias\(received_at, \d+[hd]\),", query.sql), query.panel
            assert re.search(r"\bAS metric\b", query.sql) and re.search(r"\bAS value\b", query.sql), query.panel
            assert re.search(r"ORDER BY 1\b", query.sql), query.panel


def test_plant_sql_names_only_the_central_schema(plant: dict) -> None:
    """Tables and columns as the Alembic migrations create them (service/records/central/migrations/versions/), and
    compared values a CHECK constraint allows (verdict 'OK' / 'NG')."""
    schema, checks = central_schema(), central_checks()
    assert {"inspections", "detections", "images"} <= set(schema)
    assert {"station_id", "seq", "line_id", "verdict", "received_at"} <= schema["inspections"]
    assert {"station_id", "seq", "ordinal", "class_name", "received_at"} <= schema["detections"]
    assert checks["verdict"] == {"OK", "NG"}
    for query in plant_queries(plant):
        tables = sql_tables(query.sql)
        assert tables and tables <= set(schema), f"{query.panel}: tables {sorted(tables)}"
        unknown = sql_unknown_names(query.sql, schema)
        assert not unknown, f"{query.panel}: {sorted(unknown)} are not columns of {sorted(tables)} in the migrations"
        for column, value in re.findall(r"\b([a-z_]+)\s*=\s*'([^']*)'", query.sql):
            if column in checks:
                assert value in checks[column], f"{query.panel}: {column} is never {value!r}"


def test_the_sql_check_catches_a_wrong_name() -> None:
    """The schema check above is not vacuous: a column of another table, or one that does not exist, is reported."""
    schema = central_schema()
    sql = "SELECT $__timeGroupAlias(received_at, 1h), line AS metric FROM inspections WHERE $__timeFilter(received_at)"
    assert sql_unknown_names(sql, schema) == {"line"}
    assert sql_unknown_names("SELECT class_name FROM inspections", schema) == {"class_name"}
    assert sql_unknown_names("SELECT count(*)::float8 AS n FROM detections WHERE verdict = 'NG'", schema) == set()
    assert sql_tables("SELECT 1 FROM inspection") == {"inspection"}


def test_panels_the_plant_needs_are_there(plant: dict) -> None:
    """NG rate per line per hour (24 h), NG count per station per day, top defect classes (7 days) by detections,
    inspections per station per hour."""
    panels = dashboard_panels(plant)

    def find(need: str, time_from: str | None, *parts: str) -> dict:
        found = [p for p in panels if all(part in " ".join(t["rawSql"] for t in p["targets"]) for part in parts)]
        assert found, f"no Plant panel shows {need} ({parts})"
        assert found[0].get("timeFrom") == time_from, f"{need}: panel time range {found[0].get('timeFrom')}"
        return found[0]

    ng_rate = find("NG rate per line per hour", "24h", "$__timeGroupAlias(received_at, 1h)", "line_id",
                   "verdict = 'NG'", "FROM inspections")  # fmt: skip
    assert ng_rate["fieldConfig"]["defaults"]["unit"] == "percentunit"
    find("NG count per station per day", "14d", "$__timeGroupAlias(received_at, 1d)", "station_id AS metric",
         "verdict = 'NG'", "FROM inspections")  # fmt: skip
    top = find("top defect classes", "7d", "FROM detections", "class_name", "count(*) AS detections",
               "ORDER BY detections DESC", "LIMIT")  # fmt: skip
    assert top["targets"][0]["format"] == "table"
    per_hour = find("inspections per station per hour", None, "$__timeGroupAlias(received_at, 1h)",
                    "station_id AS metric", "count(*) AS value", "FROM inspections")  # fmt: skip
    assert "verdict" not in per_hour["targets"][0]["rawSql"]


@pytest.mark.parametrize("path", [DASHBOARD, PLANT_DASHBOARD], ids=["line", "plant"])
def test_layout_fits_the_grid(path: Path) -> None:
    dashboard = load_dashboard(path)
    ids = [p["id"] for p in dashboard["panels"]]
    assert not [i for i, n in Counter(ids).items() if n > 1], "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
