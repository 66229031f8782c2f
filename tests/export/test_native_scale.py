"""export/native_scale.py: the native tile a bundle records, from training sizes, calibration data or the flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.native_scale import native_tiling
from tests.train.conftest import make_voc_dataset
from train.dataset import DatasetSplit, ImageRecord, image_size_stats, load_split

# A NEU-DET-like checkpoint: 200 px training images letterboxed into imgsz 256 (1.28 input px per frame px).
_CKPT: dict[str, Any] = {"imgsz": 256, "train_summary": {"epochs": 1, "image_size": {"median_long_side": 200.0}}}


def _tiling(**kw: Any) -> tuple[Any, str]:
    args: dict[str, Any] = {"input_width": 256, "input_height": 256, "train_imgsz": 256, "ckpt": _CKPT}
    return native_tiling(**{**args, "calibration": None, **kw})


def _record(width: int, height: int) -> ImageRecord:
    return ImageRecord(
        path=Path(f"img_{width}x{height}.jpg"),
        width=width,
        height=height,
        boxes_xyxy=np.zeros((0, 4), np.float32),
        class_ids=np.zeros(0, np.int64),
        stem=f"img_{width}x{height}",
    )


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> DatasetSplit:
    """The val split of a VOC folder of three 96x64 images: median long side 96."""
    return load_split(make_voc_dataset(tmp_path_factory.mktemp("cal"), 1, 3, size=(96, 64)), "val")


def test_training_image_size_gives_the_tile() -> None:
    spec, source = _tiling()
    assert spec is not None and (spec.tile_width, spec.tile_height) == (200, 200)
    assert spec.source == source and "training images" in source and "200 px at training imgsz 256" in source
    assert (spec.mode, spec.overlap, spec.full_frame) == ("auto", 0.25, False)


def test_larger_export_input_keeps_the_training_scale() -> None:
    spec, _ = _tiling(input_width=512, input_height=512)  # the same 1.28 scale: 512 input px cover 400 frame px
    assert spec is not None and (spec.tile_width, spec.tile_height) == (400, 400)


def test_calibration_split_when_the_checkpoint_has_no_sizes(calibration: DatasetSplit) -> None:
    ckpt = {"imgsz": 256, "train_summary": {"epochs": 1}}
    spec, source = _tiling(ckpt=ckpt, calibration=calibration)
    assert spec is not None and (spec.tile_width, spec.tile_height) == (96, 96)
    assert "val images of the calibration data" in source and "96 px" in source
    assert str(calibration.root) not in source  # no build-host path in a bundle


def test_checkpoint_sizes_win_over_the_calibration_split(calibration: DatasetSplit) -> None:
    spec, source = _tiling(calibration=calibration)
    assert spec is not None and spec.tile_width == 200 and "training images" in source


def test_no_native_scale_without_sizes_or_data() -> None:
    ckpts: list[dict[str, Any]] = [{}, {"train_summary": None}, {"train_summary": {"image_size": {}}}]
    for ckpt in ckpts:
        spec, source = _tiling(ckpt=ckpt)
        assert spec is None and source.startswith("no native scale"), (ckpt, source)


def test_native_tile_overrides_everything(calibration: DatasetSplit) -> None:
    spec, source = _tiling(calibration=calibration, native_tile=300, native_scale=2.0)
    assert spec is not None and (spec.tile_width, spec.tile_height) == (300, 300)
    assert source == spec.source == "--native-tile 300"


def test_native_scale_overrides_the_data() -> None:
    spec, source = _tiling(native_scale=2.0)
    assert spec is not None and (spec.tile_width, spec.tile_height) == (128, 128)  # 256 input px / 2
    assert source == "--native-scale 2"


def test_non_square_input_keeps_its_aspect() -> None:
    spec, _ = _tiling(input_width=256, input_height=128)
    assert spec is not None and (spec.tile_width, spec.tile_height) == (200, 100)
    spec, _ = _tiling(input_width=256, input_height=128, native_tile=300)
    assert spec is not None and (spec.tile_width, spec.tile_height) == (300, 150)


def test_tiling_options_are_recorded() -> None:
    spec, _ = _tiling(mode="on", overlap=0.5, full_frame=True)
    assert spec is not None and (spec.mode, spec.overlap, spec.full_frame) == ("on", 0.5, True)


def test_image_size_stats() -> None:
    split = DatasetSplit(["a"], [_record(100, 50), _record(60, 80), _record(200, 200)], Path("data"), "val")
    assert image_size_stats(split) == {
        "images": 3,
        "median_width": 100.0,
        "median_height": 80.0,
        "median_long_side": 100.0,  # the median of the per-image long sides (100, 80, 200), not of the widths
    }
    assert image_size_stats(DatasetSplit(["a"], [], Path("data"), "val")) == {}


def test_image_size_stats_of_a_voc_split(calibration: DatasetSplit) -> None:
    stats = image_size_stats(calibration)
    assert stats == {"images": 3, "median_width": 96.0, "median_height": 64.0, "median_long_side": 96.0}


@pytest.mark.slow
def test_export_records_the_native_tile_without_host_paths(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, yolo11n_ckpt: Path, voc_data: Path
) -> None:
    import models
    from export.pipeline import ExportOptions, run_export
    from tests.export.conftest import CLASSES, IMGSZ

    def texts(root: Path) -> str:
        return (root / "bundle.json").read_text(encoding="utf-8") + (root / "parity.json").read_text(encoding="utf-8")

    host_paths = [str(voc_data), str(yolo11n_ckpt), str(tmp_path_factory.getbasetemp())]

    # voc_data: 80x80 images; the untrained checkpoint records no training sizes -> the calibration split's scale
    out = tmp_path / "from_data"
    run_export(ExportOptions(weights=yolo11n_ckpt, out=out, calibrate_data=voc_data, max_batch=2))
    tiling = json.loads((out / "bundle.json").read_text(encoding="utf-8"))["tiling"]
    assert (tiling["tile_width"], tiling["tile_height"], tiling["mode"]) == (80, 80, "auto")  # 64 / (64 / 80)
    assert "calibration data" in tiling["source"]
    leaked = [p for p in host_paths if p in texts(out)]
    assert not leaked, f"build-host paths in bundle.json / parity.json: {leaked}"

    # a checkpoint from before 2026-12 (absolute dataset path) with training sizes, overridden by --native-tile
    ckpt = tmp_path / "trained.pt"
    summary = {"epochs": 1, "dataset": str(voc_data), "image_size": {"median_long_side": 200.0}}
    detector = models.create_model("yolo11n", nc=len(CLASSES))
    models.save_checkpoint(ckpt, detector, class_names=list(CLASSES), imgsz=IMGSZ, extra={"train_summary": summary})
    out = tmp_path / "override"
    run_export(ExportOptions(weights=ckpt, out=out, native_tile=123, max_batch=2, synthetic_images=2))
    tiling = json.loads((out / "bundle.json").read_text(encoding="utf-8"))["tiling"]
    assert (tiling["tile_width"], tiling["tile_height"], tiling["source"]) == (123, 123, "--native-tile 123")
    leaked = [p for p in [*host_paths, str(ckpt)] if p in texts(out)]
    assert not leaked, f"build-host paths in bundle.json / parity.json: {leaked}"
