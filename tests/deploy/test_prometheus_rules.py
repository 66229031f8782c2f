"""Prometheus configuration and rules, checked by Prometheus' own promtool (Debian package ``prometheus``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.stack import (
    JOB,
    PROMETHEUS_CONFIG,
    RULES,
    alert_rules,
    load_yaml,
    recording_rules,
    rule_groups,
)

CASES = Path(__file__).with_name("alert_cases.yml")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install Debian's prometheus package (apt-get install prometheus)"
)


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


@needs_promtool
def test_promtool_check_config() -> None:
    result = _promtool("check", "config", PROMETHEUS_CONFIG.name, cwd=PROMETHEUS_CONFIG.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.slow
def test_alerts_fire_on_the_cases(tmp_path: Path) -> None:
    """promtool unit tests (tests/deploy/alert_cases.yml) on the real expressions, `for` durations and labels.
    Annotations are dropped from the copy under test because promtool compares them verbatim."""
    rules = load_yaml(RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    cases = load_yaml(CASES)
    cases["rule_files"] = ["rules.yml"]
    (tmp_path / "cases.yml").write_text(yaml.safe_dump(cases), encoding="utf-8")
    result = _promtool("test", "rules", "cases.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for case in cases["tests"] for t in case["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert needs a promtool case"


def test_scrape_config_targets_the_inspection_service() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["inspect:8000"]
    assert config["rule_files"] == [RULES.name]


def test_every_alert_has_a_runbook() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    docs = (RULES.parents[2] / "docs" / "deploy.md").read_text(encoding="utf-8")
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        anchor = f"docs/deploy.md#{rule['alert'].lower()}"
        assert anchor in annotations["runbook"], f"{rule['alert']}: runbook should point to {anchor}"
        assert f"### {rule['alert']}" in docs, f"docs/deploy.md has no section for {rule['alert']}"


def test_recording_rules_follow_the_naming_convention() -> None:
    """level:metric:operation names, each recorded once; the line budget is a recorded constant the alert reads."""
    records = recording_rules()
    assert len(records) == len(set(records))
    for name in records:
        assert len(name.split(":")) == 3, name
    budget_name = "aoi:request_duration_seconds:p99_budget"
    budget = [r for g in rule_groups() for r in g["rules"] if r.get("record") == budget_name]
    assert len(budget) == 1 and budget[0]["expr"].startswith("vector(")
    for quantile in ("p50", "p95", "p99"):
        assert f"route:aoi_request_duration_seconds:{quantile}_1m" in records
        assert f"stage:aoi_stage_duration_seconds:{quantile}_1m" in records
