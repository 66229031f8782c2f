"""Structural checks of the provisioned Grafana dashboard (no Grafana server runs here: the live test evaluates the
same queries through Prometheus, see test_live_metrics.py)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from tests.deploy.stack import (
    DASHBOARD,
    DASHBOARDS,
    DATASOURCES,
    GRAFANA_MACROS,
    contract_metrics,
    dashboard_panels,
    dashboard_queries,
    load_dashboard,
    load_yaml,
    metric_names,
    recording_rules,
    rule_groups,
)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


def _provisioned_uid() -> str:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    return source["uid"]


def test_only_one_dashboard_is_shipped_and_it_has_a_stable_uid(dashboard: dict) -> None:
    assert sorted(p.name for p in DASHBOARDS.iterdir()) == [DASHBOARD.name]
    assert dashboard["uid"] == "aoi-inspect"
    assert dashboard["title"]


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


def test_layout_fits_the_grid(dashboard: dict) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert not [i for i, n in Counter(ids).items() if n > 1], "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
