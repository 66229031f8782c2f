"""End to end: checkpoint -> `aoi export` -> bundle that load_bundle accepts and the service serves."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from aoi.cli import main
from service.core.bundle import BundleError, load_bundle
from tests.export.conftest import CLASSES, IMGSZ, make_checkpoint

pytestmark = pytest.mark.slow


def _export(tmp_path: Path, ckpt: Path, *extra: str, name: str = "bundle") -> tuple[int, Path]:
    out = tmp_path / name
    rc = main(["export", "--weights", str(ckpt), "--out", str(out), "--quiet", "--max-batch", "4", *extra])
    return rc, out


async def _serve_one(bundle_dir: Path, precision: str = "auto") -> dict[str, object]:
    import httpx
    from asgi_lifespan import LifespanManager

    from service.http.app import create_app
    from service.settings import Settings
    from tests.synthetic import make_image_bytes

    settings = Settings(bundle=bundle_dir, backend="onnxruntime-cpu", max_batch_size=4, precision=precision)  # type: ignore[arg-type]
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/readyz")).status_code == 200
        info = (await c.get("/v1/model")).json()
        resp = await c.post("/v1/inspect", content=make_image_bytes(120, 90), headers={"content-type": "image/jpeg"})
        assert resp.status_code == 200, resp.text
        return {"info": info, "result": resp.json()}


def test_export_calibrated_bundle_is_served(tmp_path: Path, yolo11n_ckpt: Path, voc_data: Path) -> None:
    rc, out = _export(tmp_path, yolo11n_ckpt, "--calibrate-data", str(voc_data), "--fp16-onnx", "--name", "t.voc")
    assert rc == 0
    bundle = load_bundle(out)
    assert bundle.classes == list(CLASSES) and bundle.input.width == IMGSZ and bundle.name == "t.voc"
    assert set(bundle.files) == {"model.onnx", "model.fp16.onnx", "parity.json"}
    assert bundle.onnx.fp16_file == "model.fp16.onnx"
    assert bundle.output.num_anchors == (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2
    assert bundle.provenance["train_summary"]["epochs"] == 0 and len(bundle.provenance["source_sha256"]) == 64
    assert bundle.calibration is not None and bundle.calibration["mode"] == "f1"
    assert set(bundle.calibration["per_class"]) == set(CLASSES)
    parity = json.loads((out / "parity.json").read_text())
    fp32 = parity["comparisons"]["onnx_fp32_vs_torch_fp32"]
    assert parity["passed"] and fp32["passed"] and fp32["map"] is not None
    assert fp32["raw"]["box_max_abs"] <= fp32["tolerance"]["box_max_abs"]
    assert fp32["anchors"]["iou_min"] >= 0.99 and abs(fp32["map"]["delta_map50"]) <= 0.002
    assert "timing" in parity["comparisons"]["onnx_fp16_vs_onnx_fp32"]
    served = asyncio.run(_serve_one(out))
    assert served["info"]["name"] == "t.voc"  # type: ignore[index]
    assert served["info"]["precision"] == "fp32"  # type: ignore[index]  # auto: never FP16 on CPU
    served = asyncio.run(_serve_one(out, precision="fp16"))
    assert served["info"]["precision"] == "fp16"  # type: ignore[index]


def test_hash_check_detects_modified_file(tmp_path: Path, yolo11n_ckpt: Path) -> None:
    rc, out = _export(tmp_path, yolo11n_ckpt, "--target-recall", "0.5")
    assert rc == 0
    bundle = load_bundle(out)
    assert bundle.calibration is not None and bundle.calibration["mode"] == "default"  # no data: default + warning
    assert bundle.onnx.fp16_file is None  # no --fp16-onnx
    assert "default score threshold" in bundle.calibration["warning"]
    assert bundle.thresholds() == [0.25] * len(CLASSES)
    with (out / "parity.json").open("a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(out)


def test_recall_mode_records_target(tmp_path: Path, yolo11n_ckpt: Path, voc_data: Path) -> None:
    rc, out = _export(tmp_path, yolo11n_ckpt, "--calibrate-data", str(voc_data), "--target-recall", "0.5")
    assert rc == 0
    cal = load_bundle(out).calibration
    assert cal is not None and cal["mode"] == "recall" and cal["target_recall"] == 0.5
    for c in cal["per_class"].values():
        assert "threshold" in c and "precision" in c and "recall" in c


def _all_variants() -> list[str]:
    """Every variant but the m/l/x scales, which are the n/s blocks at other widths (minutes to export on CPU)."""
    from models import VARIANTS

    return [name for name in VARIANTS if name[-1] not in "mlx"]


@pytest.mark.parametrize("variant", _all_variants())
def test_every_variant_exports_within_parity(tmp_path: Path, variant: str) -> None:
    from export.pipeline import ExportOptions, run_export

    ckpt = make_checkpoint(tmp_path / f"{variant}.pt", variant)
    result = run_export(ExportOptions(weights=ckpt, out=tmp_path / "b", max_batch=2, synthetic_images=2))
    comp = result.parity["comparisons"]["onnx_fp32_vs_torch_fp32"]
    assert comp["passed"], comp["failures"]
    assert result.bundle.architecture == variant and result.bundle.onnx.opset >= 17


def test_bad_calibration_data_is_a_clean_error_and_leaves_nothing(
    tmp_path: Path, yolo11n_ckpt: Path, voc_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    bad = tmp_path / "bad-voc"
    shutil.copytree(voc_data, bad)
    xml = sorted((bad / "ANNOTATIONS").glob("*.xml"))[0]
    xml.write_text(xml.read_text().replace("<name>", "<name>no-such-class-", 1))  # a class the dataset never names
    for data, split in ((bad, "val"), (voc_data, "nosuchsplit")):
        rc, out = _export(tmp_path, yolo11n_ckpt, "--calibrate-data", str(data), "--split", split, name="b")
        err = capsys.readouterr().err
        assert rc == 2 and "aoi export: error:" in err and "Traceback" not in err, err
        assert not out.exists() and not (tmp_path / ".b.partial").exists()


def test_default_name_comes_from_the_dataset_folder(tmp_path: Path) -> None:
    from export.pipeline import dataset_tag

    assert dataset_tag(Path("/data/NEU-DET"), {}) == "neu-det"
    assert dataset_tag(Path("/data/DeepPCB/data.yaml"), {}) == "deeppcb"
    assert dataset_tag(Path("/data/yaml/pcb.yaml"), {}) == "pcb"
    assert dataset_tag(None, {"train_summary": {"dataset": "/x/GC10-DET"}}) == "gc10-det"
    assert dataset_tag(None, {}) == "custom"
