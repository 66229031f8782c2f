"""service/settings.py: environment, YAML file, precedence and validation errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, get_settings


def test_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AOI_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("AOI_VERDICT__MIN_BOX_AREA", "25")
    s = get_settings()
    assert s.max_batch_size == 16 and s.bundle == Path("bundles/default") and s.backend == "auto"
    assert s.verdict is not None and s.verdict.min_box_area == 25


def test_yaml_file_env_and_flags_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "aoi.yaml"
    cfg.write_text("max_delay_ms: 5\nport: 9000\nscore_thresholds:\n  scratch: 0.4\nlog_level: debug\n")
    monkeypatch.setenv("AOI_PORT", "9100")
    s = get_settings(cfg, backend="onnxruntime-cpu")
    assert (s.max_delay_ms, s.port, s.backend, s.log_level) == (5.0, 9100, "onnxruntime-cpu", "DEBUG")
    assert s.score_thresholds == {"scratch": 0.4}
    monkeypatch.setenv("AOI_CONFIG", str(cfg))
    assert get_settings(port=7000).port == 7000


@pytest.mark.parametrize(
    ("yaml_text", "match"),
    [
        ("max_batch_size: 0\n", "max_batch_size"),
        ("backend: cuda\n", "backend"),
        ("score_thresholds: {scratch: 1.5}\n", "score thresholds must be in"),
        ("no_such_setting: 1\n", "no_such_setting"),
        ("- a list\n", "top level must be a mapping"),
        ("max_delay_ms: [\n", "not valid YAML"),
    ],
)
def test_invalid_settings_name_the_file_and_field(tmp_path: Path, yaml_text: str, match: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(SettingsError, match=match) as info:
        get_settings(cfg)
    assert str(cfg) in str(info.value)


def test_invalid_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AOI_QUEUE_SIZE", "lots")
    with pytest.raises(SettingsError, match="queue_size"):
        get_settings()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read settings file"):
        get_settings(tmp_path / "absent.yaml")


def test_precision_and_backend_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_settings().precision == "auto"
    monkeypatch.setenv("AOI_PRECISION", "fp16")
    monkeypatch.setenv("AOI_BACKEND", "onnxruntime-trt")
    s = get_settings()
    assert (s.precision, s.backend) == ("fp16", "onnxruntime-trt")
    assert get_settings(precision="fp32").precision == "fp32"
    monkeypatch.setenv("AOI_PRECISION", "int8")
    monkeypatch.setenv("AOI_BACKEND", "openvino")
    monkeypatch.setenv("AOI_OPENVINO_CACHE", "/var/cache/aoi/openvino")
    s = get_settings()
    assert (s.precision, s.backend, s.openvino_cache) == ("int8", "openvino", Path("/var/cache/aoi/openvino"))
    monkeypatch.delenv("AOI_OPENVINO_CACHE")
    assert Settings().openvino_cache is None  # the backend then uses <engine_cache>/openvino
    monkeypatch.setenv("AOI_PRECISION", "int4")
    with pytest.raises(SettingsError, match="precision"):
        get_settings()


def test_settings_are_built_directly_in_tests() -> None:
    assert Settings(max_delay_ms=0).max_delay_ms == 0


def test_max_delay_and_instances_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    s = get_settings()
    assert (s.max_delay_ms, s.instances) == ("auto", 0)
    monkeypatch.setenv("AOI_MAX_DELAY_MS", "3.5")
    monkeypatch.setenv("AOI_INSTANCES", "3")
    s = get_settings()
    assert (s.max_delay_ms, s.instances) == (3.5, 3)
    for bad in ("soon", "-1", "5000"):
        monkeypatch.setenv("AOI_MAX_DELAY_MS", bad)
        with pytest.raises(SettingsError, match="max_delay_ms"):
            get_settings()
    monkeypatch.setenv("AOI_MAX_DELAY_MS", "auto")
    monkeypatch.setenv("AOI_INSTANCES", "-1")
    with pytest.raises(SettingsError, match="instances"):
        get_settings()


def test_request_ids_differ_after_fork() -> None:
    import os

    from service.log_config import new_request_id

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next id and leave without running pytest's teardown
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 32 and child != new_request_id()


def test_unknown_environment_variable_is_refused_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AOI_MAX_BATCHSIZE", "16")  # typo of AOI_MAX_BATCH_SIZE
    with pytest.raises(SettingsError, match=r"AOI_MAX_BATCHSIZE \(did you mean AOI_MAX_BATCH_SIZE\?\)"):
        get_settings()
    monkeypatch.delenv("AOI_MAX_BATCHSIZE")
    monkeypatch.setenv("AOI_TILING__MODE", "on")  # nested names are checked by the nested model itself
    assert get_settings().tiling.mode == "on"
    monkeypatch.setenv("AOI_TILING__MOOD", "on")
    with pytest.raises(SettingsError, match=r"tiling\.mood"):
        get_settings()
