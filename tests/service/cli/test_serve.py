"""`aoi serve` startup errors (bundle problems name the file and say how to get a bundle) and torch-free imports."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from aoi.cli import main
from tests.synthetic import make_synthetic_bundle

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    where = [] if "--port" in args else ["--host", "127.0.0.1", "--port", str(_free_port())]  # the port binds first
    rc = main(["serve", *where, *args])
    return rc, capsys.readouterr().err


def test_busy_port_is_reported_before_the_model_loads(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        # the bundle does not even exist: the port is checked first, so that is not what is reported
        rc, err = _serve(capsys, "--host", "127.0.0.1", "--port", port, "--bundle", str(tmp_path / "nowhere"))
    assert rc == 2 and f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err
    assert "nowhere" not in err and "Traceback" not in err


def test_missing_default_bundle_says_how_to_get_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rc, err = _serve(capsys)
    assert rc == 2
    assert "aoi serve: error: bundles/default" in err and "does not exist" in err and "aoi export" in err


@pytest.fixture
def good_bundle(tmp_path: Path) -> Path:
    return make_synthetic_bundle(tmp_path / "b")


def test_missing_model_file(capsys: pytest.CaptureFixture[str], good_bundle: Path) -> None:
    (good_bundle / "model.onnx").unlink()
    rc, err = _serve(capsys, "--bundle", str(good_bundle))
    assert rc == 2 and f"{good_bundle / 'model.onnx'}: missing" in err


def test_corrupt_bundle_json(capsys: pytest.CaptureFixture[str], good_bundle: Path) -> None:
    (good_bundle / "bundle.json").write_text("{not json")
    rc, err = _serve(capsys, "--bundle", str(good_bundle))
    assert rc == 2 and f"{good_bundle / 'bundle.json'}: not valid JSON" in err


def test_hash_mismatch(capsys: pytest.CaptureFixture[str], good_bundle: Path) -> None:
    with (good_bundle / "model.onnx").open("ab") as f:
        f.write(b"\0")
    rc, err = _serve(capsys, "--bundle", str(good_bundle))
    assert rc == 2 and f"{good_bundle / 'model.onnx'}: sha256 mismatch" in err


def test_schema_violation_names_the_field(capsys: pytest.CaptureFixture[str], good_bundle: Path) -> None:
    meta = json.loads((good_bundle / "bundle.json").read_text())
    meta["input"]["width"] = 50
    (good_bundle / "bundle.json").write_text(json.dumps(meta))
    rc, err = _serve(capsys, "--bundle", str(good_bundle))
    assert rc == 2 and "input.width" in err


def test_unknown_threshold_class_and_bad_setting(
    capsys: pytest.CaptureFixture[str], good_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AOI_SCORE_THRESHOLDS", '{"crack": 0.3}')
    monkeypatch.setenv("AOI_BACKEND", "onnxruntime-cpu")
    rc, err = _serve(capsys, "--bundle", str(good_bundle))
    assert rc == 2 and "unknown classes ['crack']" in err
    monkeypatch.setenv("AOI_MAX_DELAY_MS", "-1")
    rc, err = _serve(capsys, "--bundle", str(good_bundle))
    assert rc == 2 and "max_delay_ms" in err


def test_fp16_requested_without_fp16_onnx(capsys: pytest.CaptureFixture[str], good_bundle: Path) -> None:
    rc, err = _serve(capsys, "--bundle", str(good_bundle), "--backend", "onnxruntime-cpu", "--precision", "fp16")
    assert rc == 2 and f"aoi serve: error: {good_bundle}: " in err
    assert "precision fp16 requested, but the bundle has no FP16 ONNX" in err and "--fp16-onnx" in err


@pytest.mark.integration
def test_service_never_imports_torch() -> None:
    code = (
        "import sys, service.http.app, service.cli.serve, benchmarks.service_bench, service.backends.trt_backend, "
        "service.backends.ort_backend, service.backends.ort_providers, service.core.postprocess\n"
        "from aoi.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('torch', 'tensorrt', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\nprint('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout and "--bundle" in out.stdout


@pytest.mark.integration
def test_aoi_console_script_help() -> None:
    beside = Path(sys.executable).parent / "aoi"  # the venv's scripts, also when the venv is not activated
    exe = str(beside) if beside.exists() else shutil.which("aoi")
    if exe is None:
        pytest.skip("aoi console script not installed in this environment")
    out = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--backend" in out.stdout


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [(["models"], "torch", "train"), (["export", "--weights", "w.pt", "--out", "o"], "onnx", "train")],
)
def test_missing_optional_dependency_names_the_install_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], module: str, extra: str
) -> None:
    """`make serve` installs only the runtime: a command needing the train extra says how to get it, no traceback."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    for name in [m for m in sys.modules if m.split(".")[0] in ("models", "export", "train")]:
        monkeypatch.delitem(sys.modules, name)  # re-imported below, so that they meet the missing module
    monkeypatch.setitem(sys.modules, module, None)  # import of it now raises ModuleNotFoundError
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and f"missing dependency '{module}'" in err and f"install -e '.[{extra}]'" in err, err


def test_unusable_data_dir_is_a_clear_startup_error(
    capsys: pytest.CaptureFixture[str], good_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AOI_DATA_DIR", str(blocker / "data"))
    rc, err = _serve(capsys, "--bundle", str(good_bundle))
    assert rc == 2 and f"data_dir {blocker / 'data'}: cannot write there" in err and "AOI_DATA_DIR" in err
    assert "Traceback" not in err

    data = tmp_path / "data"
    data.mkdir()
    (data / "records.sqlite3").write_bytes(b"this is no database, it is " * 200)
    monkeypatch.setenv("AOI_DATA_DIR", str(data))
    rc, err = _serve(capsys, "--bundle", str(good_bundle))
    assert rc == 2 and f"{data / 'records.sqlite3'}: not a usable records database" in err
    assert "Traceback" not in err
