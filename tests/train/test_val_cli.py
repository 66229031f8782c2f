"""train/val_cli.py (`aoi val`): a served bundle scored end to end through the service backend (tiled as served), a
torch checkpoint, the --json / --save-coco / --plots outputs, and clear errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from aoi.cli import main
from service.core.bundle import TilingSpec, load_bundle, write_bundle
from tests.synthetic import make_synthetic_bundle
from tests.train.conftest import make_voc_dataset

# 128x128 images letterboxed to the bundle's 64: scale 0.5. A 32x32 patch at (24, 24) lands on input (12..28), which
# the synthetic model's anchor at (20, 20) covers exactly, with score 1 for the patch's colour channel.
_PATCHES = [((24, 24), 0), ((72, 40), 1), ((24, 88), 0)]


def _patch_dataset(root: Path, side: int = 128) -> Path:
    """Three ``side`` px images, each with one patch of ``side / 4`` px at ``_PATCHES`` scaled by ``side / 128``."""
    for sub in ("IMAGES", "ANNOTATIONS", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("scratch\ndent\n", encoding="utf-8")
    stems = []
    p = side // 4
    for i, ((x0, y0), cls) in enumerate(_PATCHES):
        x, y = x0 * side // 128, y0 * side // 128
        rgb = np.zeros((side, side, 3), np.uint8)
        rgb[y : y + p, x : x + p, cls] = 255  # class 0 = red, class 1 = green (the synthetic model's channels)
        cv2.imwrite(str(root / "IMAGES" / f"p{i}.png"), rgb[:, :, ::-1])
        name = ("scratch", "dent")[cls]
        (root / "ANNOTATIONS" / f"p{i}.xml").write_text(
            f"<annotation><size><width>{side}</width><height>{side}</height></size><object><name>{name}</name>"
            f"<bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + p + 1}</xmax><ymax>{y + p + 1}</ymax>"
            "</bndbox></object></annotation>",
            encoding="utf-8",
        )
        stems.append(f"p{i}.png")
    (root / "splits" / "val.txt").write_text("\n".join(stems) + "\n", encoding="utf-8")
    return root


def test_bundle_is_scored_through_the_service_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_synthetic_bundle(tmp_path / "bundle", max_batch=2)
    data = _patch_dataset(tmp_path / "data")
    out = tmp_path / "out"
    args = ["val", "--model", str(bundle), "--data", str(data), "--batch", "2", "--json", str(out / "m.json")]
    rc = main([*args, "--save-coco", str(out / "dets.json"), "--plots", str(out / "plots")])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "m.json").read_text())
    assert metrics["map50"] == 1.0 and metrics["map50_95"] == 1.0
    assert metrics["per_class"] == {"scratch": {"ap50": 1.0, "ap50_95": 1.0}, "dent": {"ap50": 1.0, "ap50_95": 1.0}}
    # 32x32 = 32^2 exactly: COCOeval's inclusive area bounds count it as small AND medium; none is large.
    assert metrics["ap_small"] == 1.0 and metrics["ap_medium"] == 1.0 and metrics["ap_large"] is None
    dets = json.loads((out / "dets.json").read_text())
    best = max((d for d in dets if d["image_id"] == "p1"), key=lambda d: d["score"])
    assert best["category_id"] == 1 and best["score"] == pytest.approx(1.0)
    assert best["bbox"] == pytest.approx([72, 40, 32, 32])  # original pixels, 0-based x, y, w, h
    assert {p.name for p in (out / "plots").iterdir()} >= {"PR_curve.png", "confusion_matrix.png", "per_class_ap.png"}
    table = capsys.readouterr().out
    assert "all" in table and "scratch" in table and "AP50-95 by size" in table


def _tiled_bundle(root: Path) -> Path:
    """The synthetic bundle (64 px input) with a native tile of 64 frame px: scale 1."""
    root = make_synthetic_bundle(root, max_batch=4)
    bundle = load_bundle(root)
    write_bundle(bundle.model_copy(update={"tiling": TilingSpec(tile_width=64, tile_height=64, source="test")}), root)
    return root


def _metrics(path: Path) -> dict[str, Any]:
    metrics: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return metrics


def test_images_at_the_native_tile_are_not_tiled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _tiled_bundle(tmp_path / "bundle")
    data = _patch_dataset(tmp_path / "data", side=64)  # 64 px images: the native field exactly
    results = {}
    for mode in ("auto", "off"):
        out = tmp_path / f"{mode}.json"
        rc = main(["val", "--model", str(bundle), "--data", str(data), "--tiling", mode, "--json", str(out)])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert "images tiled" not in err  # auto tiles only frames over 1.25x the native field
        results[mode] = _metrics(out)
    assert results["auto"] == results["off"]
    assert results["auto"]["map50"] == 1.0  # each patch fills exactly one anchor's box at scale 1


def test_tiling_on_with_a_smaller_native_tile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _tiled_bundle(tmp_path / "bundle")
    data = _patch_dataset(tmp_path / "data", side=64)
    out = tmp_path / "m.json"
    args = ["val", "--model", str(bundle), "--data", str(data), "--json", str(out), "--batch", "4"]
    rc = main([*args, "--tiling", "on", "--native-tile", "32"])
    err = capsys.readouterr().err
    assert rc == 0, err
    # 64 px in 32 px tiles overlapping >= 8 px: 3 x 3 tiles per image
    assert "tiling: 3 of 3 images tiled (27 model inputs; settings tiling.native_tile = 32)" in err
    metrics = _metrics(out)
    for key in ("map50", "map50_95", "precision", "recall"):
        value = metrics[key]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)
    assert metrics["map50_95"] <= metrics["map50"]

    assert main([*args, "--native-tile", "0"]) == 2
    assert "--native-tile: must be >= 1 frame pixels, got 0" in capsys.readouterr().err


@pytest.mark.slow  # builds a yolo11n and imports torch: a few seconds on a busy 2-core machine
def test_checkpoint_is_evaluated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import models

    data = make_voc_dataset(tmp_path / "voc", 2, 3)
    ckpt = tmp_path / "m.pt"
    model = models.create_model("yolo11n", nc=3)
    models.save_checkpoint(ckpt, model, class_names=["disc", "rect", "triangle"], imgsz=64)
    rc = main(["val", "--model", str(ckpt), "--data", str(data), "--json", str(tmp_path / "m.json")])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics["per_class"]) == {"disc", "rect", "triangle"}
    assert 0.0 <= metrics["map50_95"] <= metrics["map50"] <= 1.0
    assert "3 images" in capsys.readouterr().out


def test_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_synthetic_bundle(tmp_path / "bundle")
    data = _patch_dataset(tmp_path / "data")

    assert main(["val", "--model", str(bundle), "--data", str(tmp_path / "missing")]) == 2
    assert "aoi val: error:" in (err := capsys.readouterr().err) and "dataset not found" in err

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["val", "--model", str(junk), "--data", str(data)]) == 2
    assert f"{junk}: not a loadable checkpoint" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert main(["val", "--model", str(tmp_path / "empty"), "--data", str(data)]) == 2
    assert "bundle.json" in capsys.readouterr().err

    assert main(["val", "--model", str(tmp_path / "nope.pt"), "--data", str(data)]) == 2
    assert "model not found" in capsys.readouterr().err

    other = make_voc_dataset(tmp_path / "voc", 1, 1)
    assert main(["val", "--model", str(bundle), "--data", str(other)]) == 2
    assert "differ from the dataset's" in capsys.readouterr().err

    assert main(["val", "--model", str(bundle), "--data", str(data), "--imgsz", "128"]) == 2
    assert "fixed at 64x64" in capsys.readouterr().err
