"""Ultralytics ``best.pt`` import: real YOLO11n / YOLOv8n fixtures load into our classes and match Ultralytics' ONNX.

The fixtures (tests/fixtures/ultralytics/README.md) were written once by Ultralytics 8.4 in a throwaway environment;
ultralytics is not installed here, and nothing in the files runs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models import CheckpointError, InferenceModel, load_checkpoint, read_checkpoint
from models.safe_unpickle import Record, load_torch_archive
from models.ultralytics_ckpt import UltralyticsError, convert_ultralytics

FIXTURES = Path(__file__).parents[1] / "fixtures" / "ultralytics"
YOLO11N, YOLOV8N, YOLO11N_ONNX = FIXTURES / "yolo11n-nc2.pt", FIXTURES / "yolov8n-nc2.pt", FIXTURES / "yolo11n-nc2.onnx"
# Boxes in input pixels within 1e-3 (measured ~1e-4: FP16 weights computed in float32 on both sides); the scores of a
# one-epoch model are ~1e-3 themselves, so they are held to a relative 1e-3 instead (measured ~1e-7 absolute).
BOX_ATOL, SCORE_RTOL = 1e-3, 1e-3


def _assert_same(ours: np.ndarray, expected: np.ndarray, x: np.ndarray) -> None:
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours[:, :4], expected[:, :4], rtol=0, atol=BOX_ATOL)
    np.testing.assert_allclose(ours[:, 4:], expected[:, 4:], rtol=SCORE_RTOL, atol=1e-7)
    # the comparison has teeth: a freshly initialised model (the fixtures trained 1 epoch) is 50x the tolerance off
    fresh = models.create_model("yolo11n", nc=2).eval()
    with torch.no_grad():
        untrained = InferenceModel(fresh)(torch.from_numpy(x)).numpy()
    assert np.abs(untrained[:, :4] - expected[:, :4]).max() > 50 * BOX_ATOL


def _ours(path: Path, x: np.ndarray) -> np.ndarray:
    model, _ = load_checkpoint(path)
    with torch.no_grad():
        return InferenceModel(model)(torch.from_numpy(x)).numpy()


def test_yolo11n_fixture_matches_the_onnx_ultralytics_exported_from_it() -> None:
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(7).random((2, 3, 64, 64), dtype=np.float32)
    session = ort.InferenceSession(str(YOLO11N_ONNX), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"images": x})
    ours = _ours(YOLO11N, x)
    assert expected.shape == (2, 4 + 2, 8 * 8 + 4 * 4 + 2 * 2)
    _assert_same(ours, expected, x)


def test_yolov8n_fixture_matches_ultralytics_onnx_output() -> None:
    ref = np.load(FIXTURES / "yolov8n-nc2.reference.npz")  # Ultralytics' ONNX run by onnxruntime when it was made
    _assert_same(_ours(YOLOV8N, ref["images"]), ref["output0"], ref["images"])


@pytest.mark.parametrize(("path", "variant"), [(YOLO11N, "yolo11n"), (YOLOV8N, "yolov8n")])
def test_metadata_comes_from_the_records(path: Path, variant: str) -> None:
    ckpt = read_checkpoint(path)
    assert (ckpt["variant"], ckpt["nc"], ckpt["class_names"], ckpt["imgsz"]) == (variant, 2, ["dent", "scratch"], 64)
    assert ckpt["fused"] is False and ckpt["imported_from"]["format"] == "ultralytics"
    assert ckpt["imported_from"]["ultralytics_version"].startswith("8.")
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    own = models.create_model(variant, nc=2).state_dict()
    assert own.keys() == ckpt["state_dict"].keys()


def _rewrite_pickle(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """Copy a torch zip, replacing a GLOBAL's text in data.pkl (protocol-2 GLOBAL opcodes are newline-terminated)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(item, data)
    return dst


@pytest.mark.parametrize(
    ("old", "new", "what"),
    [
        (b"\nDetectionModel\n", b"\nSegmentationModel\n", "a segmentation model"),
        (b"\nDetectionModel\n", b"\nPoseModel\n", "a pose model"),
        (b"head\nDetect\n", b"head\nOBB\n", "the last layer is OBB"),
        (b"\nDetectionModel\n", b"\nRTDETRDetectionModel\n", "an RT-DETR model"),
    ],
)
def test_other_tasks_are_refused_with_what_is_supported(tmp_path: Path, old: bytes, new: bytes, what: str) -> None:
    other = _rewrite_pickle(YOLO11N, tmp_path / "other.pt", old, new)
    with pytest.raises(CheckpointError, match=f"other\\.pt: {what}.*YOLO11 and YOLOv8 detection models"):
        load_checkpoint(other)


def test_a_missing_scale_is_found_from_the_weights() -> None:
    raw = load_torch_archive(YOLOV8N)
    del raw["model"].__dict__["yaml"]["scale"]
    assert convert_ultralytics(raw, YOLOV8N)["variant"] == "yolov8n"


def test_another_family_is_refused() -> None:
    raw = load_torch_archive(YOLO11N)
    layers = raw["model"].__dict__["_modules"]["model"].__dict__["_modules"]
    for key, layer in layers.items():  # an architecture without C3k2 or C2f blocks (a YOLOv5-style C3 network)
        if layer.qualname.endswith(".C3k2"):
            layers[key] = type("C3", (Record,), {"qualname": "ultralytics.nn.modules.block.C3"})()
    with pytest.raises(UltralyticsError, match="neither YOLO11 nor YOLOv8"):
        convert_ultralytics(raw, YOLO11N)


def test_export_cli_reads_an_ultralytics_checkpoint_once_refused_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aoi.cli import main

    seg = _rewrite_pickle(YOLO11N, tmp_path / "seg.pt", b"\nDetectionModel\n", b"\nSegmentationModel\n")
    assert main(["export", "--weights", str(seg), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "seg.pt: a segmentation model" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
