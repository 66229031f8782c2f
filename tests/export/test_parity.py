"""Parity checks on hand-made outputs, and the CLI's error messages for bad input (fast, no export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aoi.cli import main
from export.parity import FP16_TOLERANCE, FP32_TOLERANCE, compare_anchors, compare_runs, raw_diff
from export.report import format_summary
from service.core.postprocess import postprocess
from service.core.preprocess import LetterboxInfo


def _outputs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((2, 4 + 2, 50), np.float32)
    out[:, :2] = rng.uniform(10, 54, (2, 2, 50))
    out[:, 2:4] = rng.uniform(4, 20, (2, 2, 50))
    out[:, 4:] = rng.uniform(0, 1, (2, 2, 50))
    return out


def _dets(out: np.ndarray) -> list:
    infos = [LetterboxInfo(1.0, 0.0, 0.0, 64, 64)] * out.shape[0]
    return postprocess(out, infos, [0.001, 0.001])


def _run(ref: np.ndarray, cand: np.ndarray, tol=FP32_TOLERANCE, **kw):  # type: ignore[no-untyped-def]
    return compare_runs("t", reference="r", candidate="c", ref_out=ref, cand_out=cand, ref_dets=_dets(ref),
                        cand_dets=_dets(cand), tolerance=tol, **kw)  # fmt: skip


def test_identical_outputs_pass() -> None:
    out = _outputs()
    res = _run(out, out.copy())
    assert res.passed and res.raw["box_max_abs"] == 0.0 and res.detections["match_rate"] == 1.0
    assert res.anchors["iou_min"] == 1.0 and res.to_json()["passed"] is True


def test_box_shift_breaks_fp32_tolerance_but_not_fp16() -> None:
    ref = _outputs()
    cand = ref.copy()
    cand[0, 0, 3] += 1.0  # one box moved by 1 px
    res = _run(ref, cand)
    assert not res.passed and any("box" in f for f in res.failures)
    assert _run(ref, cand, FP16_TOLERANCE).passed


def test_score_drift_and_nan_fail() -> None:
    ref = _outputs()
    cand = ref.copy()
    cand[1, 5, 7] += 0.01
    assert any("score" in f for f in _run(ref, cand).failures)
    cand[1, 5, 7] = np.nan
    assert raw_diff(ref, cand)["score_max_abs"] == float("inf")


def test_map_delta_is_enforced() -> None:
    out = _outputs()
    ok = _run(out, out, ref_map={"map50": 0.8, "map50_95": 0.5}, cand_map={"map50": 0.801, "map50_95": 0.5})
    assert ok.passed and ok.map is not None and ok.map["delta_map50"] == pytest.approx(0.001)
    ref_map, cand_map = {"map50": 0.8, "map50_95": 0.5}, {"map50": 0.78, "map50_95": 0.5}
    bad = _run(out, out, FP16_TOLERANCE, ref_map=ref_map, cand_map=cand_map)
    assert [f for f in bad.failures if "mAP50" in f]


def test_anchor_iou_sees_a_wrong_box() -> None:
    ref = _outputs()
    cand = ref.copy()
    cand[0, 2:4, 0] *= 2.0  # w, h doubled -> IoU 0.25 at that anchor
    assert compare_anchors(ref, cand)["iou_min"] == pytest.approx(0.25, abs=1e-4)


def test_summary_table_lists_files_and_classes(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x" * 2048)
    out = _outputs()
    parity = {"images": {"count": 2, "source": "test"}, "comparisons": {"a_vs_b": _run(out, out).to_json()}}
    text = format_summary(tmp_path, parity, {"scratch": {"threshold": 0.31, "precision": 0.9, "recall": 0.8}})
    assert "model.onnx" in text and "2.0 KiB" in text and "a_vs_b" in text and "PASS" in text and "scratch" in text


def test_cli_missing_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", "--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b")])
    assert rc == 2 and "nope.pt: checkpoint not found" in capsys.readouterr().err


def test_cli_refuses_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    rc = main(["export", "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "b"), "--overwrite"])
    assert rc == 2 and "no bundle.json" in capsys.readouterr().err
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"


def test_cli_engine_without_tensorrt_stops_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.backends.trt_build import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are available here")
    (tmp_path / "w.pt").write_bytes(b"")
    rc = main(["export", "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "b"), "--engine"])
    err = capsys.readouterr().err
    assert rc == 2 and "--engine: cannot build a TensorRT engine here" in err and "without --engine" in err
    assert not (tmp_path / "b").exists()


def test_cli_bad_batch_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "w.pt").write_bytes(b"")
    rc = main(["export", "--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "b"), "--max-batch", "2",
               "--opt-batch", "4"])  # fmt: skip
    assert rc == 2 and "--opt-batch" in capsys.readouterr().err
