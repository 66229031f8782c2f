"""service/core/bundle.py: schema round trip with and without the FP16 ONNX, and the checks load_bundle makes on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.core.bundle import BUNDLE_FILE, BundleError, load_bundle, write_bundle
from tests.synthetic import make_synthetic_bundle


@pytest.fixture
def fp16_dir(tmp_path: Path) -> Path:
    return make_synthetic_bundle(tmp_path / "fp16", fp16=True)


def _edit_json(root: Path, edit: dict[str, object]) -> None:
    meta = json.loads((root / BUNDLE_FILE).read_text())
    meta["onnx"].update(edit)
    (root / BUNDLE_FILE).write_text(json.dumps(meta))


def test_round_trip_without_fp16(tmp_path: Path) -> None:
    root = make_synthetic_bundle(tmp_path / "b")
    bundle = load_bundle(root)
    assert bundle.onnx.fp16_file is None and set(bundle.files) == {"model.onnx"}
    assert json.loads((root / BUNDLE_FILE).read_text())["onnx"]["fp16_file"] is None
    write_bundle(bundle, root)
    assert load_bundle(root) == bundle


def test_bundle_written_before_fp16_file_existed_still_loads(tmp_path: Path) -> None:
    root = make_synthetic_bundle(tmp_path / "old")
    meta = json.loads((root / BUNDLE_FILE).read_text())
    del meta["onnx"]["fp16_file"]  # schema 1 bundles from before the field
    (root / BUNDLE_FILE).write_text(json.dumps(meta))
    assert load_bundle(root).onnx.fp16_file is None


def test_round_trip_with_fp16(fp16_dir: Path) -> None:
    bundle = load_bundle(fp16_dir)
    assert bundle.onnx.fp16_file == "model.fp16.onnx"
    assert set(bundle.files) == {"model.onnx", "model.fp16.onnx"}
    assert json.loads((fp16_dir / BUNDLE_FILE).read_text())["onnx"]["fp16_file"] == "model.fp16.onnx"
    write_bundle(bundle, fp16_dir)
    assert load_bundle(fp16_dir) == bundle


def test_hash_check_covers_the_fp16_file(fp16_dir: Path) -> None:
    with (fp16_dir / "model.fp16.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256 mismatch") as info:
        load_bundle(fp16_dir)
    assert info.value.path == fp16_dir / "model.fp16.onnx"
    assert load_bundle(fp16_dir, verify_hashes=False).onnx.fp16_file == "model.fp16.onnx"


def test_fp16_file_named_but_missing(fp16_dir: Path) -> None:
    (fp16_dir / "model.fp16.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.fp16\.onnx: missing \(named in bundle\.json\)"):
        load_bundle(fp16_dir)


def test_fp16_file_named_but_not_hashed(fp16_dir: Path) -> None:
    meta = json.loads((fp16_dir / BUNDLE_FILE).read_text())
    del meta["files"]["model.fp16.onnx"]
    (fp16_dir / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"files has no sha256 for model\.fp16\.onnx"):
        load_bundle(fp16_dir)


def test_fp16_file_of_wrong_type_names_the_field(tmp_path: Path) -> None:
    root = make_synthetic_bundle(tmp_path / "b")
    _edit_json(root, {"fp16_file": 16})
    with pytest.raises(BundleError, match=r"onnx\.fp16_file"):
        load_bundle(root)


def test_int8_file_named_but_missing_and_ranking_checked(tmp_path: Path) -> None:
    root = make_synthetic_bundle(tmp_path / "b")
    _edit_json(root, {"int8_file": "model.int8.onnx", "cpu_precisions": ["int8", "fp32"]})
    with pytest.raises(BundleError, match=r"model\.int8\.onnx: missing \(named in bundle\.json\)"):
        load_bundle(root)
    _edit_json(root, {"int8_file": None, "cpu_precisions": ["fp32"]})
    meta = json.loads((root / BUNDLE_FILE).read_text())
    meta["cpu_ranking"] = [{"backend": "onnxruntime-cpu", "precision": "int8"}]
    (root / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"cpu_ranking names onnxruntime-cpu int8, which its section does not list"):
        load_bundle(root)
    meta["cpu_ranking"] = [
        {"backend": "openvino", "precision": "fp32"},
        {"backend": "onnxruntime-cpu", "precision": "fp32"},
    ]
    (root / BUNDLE_FILE).write_text(json.dumps(meta))
    assert [c.backend for c in load_bundle(root).cpu_ranking] == ["openvino", "onnxruntime-cpu"]


def test_uint8_nhwc_input_spec_rules() -> None:
    from pydantic import ValidationError

    from service.core.bundle import InputSpec

    spec = InputSpec(width=64, height=32, layout="NHWC", dtype="uint8")
    assert spec.pixels_in_graph and spec.sample_shape == (32, 64, 3)
    old = InputSpec(width=64, height=32)
    assert (
        not old.pixels_in_graph and old.sample_shape == (3, 32, 64) and (old.layout, old.dtype) == ("NCHW", "float32")
    )
    for layout, dtype in (("NCHW", "uint8"), ("NHWC", "float32"), ("NHWC", "float16")):
        with pytest.raises(ValidationError, match=f"layout {layout} with dtype {dtype}; a uint8 input is NHWC"):
            InputSpec(width=64, height=32, layout=layout, dtype=dtype)  # type: ignore[arg-type]


def test_uint8_input_needs_schema_version_2(tmp_path: Path) -> None:
    root = make_synthetic_bundle(tmp_path / "b")
    meta = json.loads((root / BUNDLE_FILE).read_text())
    assert meta["schema_version"] == 1  # float bundles are still written as schema 1: older readers load them
    meta["input"].update(layout="NHWC", dtype="uint8")
    (root / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="uint8 NHWC input needs schema_version 2"):
        load_bundle(root)
    meta["schema_version"] = 2
    (root / BUNDLE_FILE).write_text(json.dumps(meta))
    assert load_bundle(root).input.pixels_in_graph
    meta["schema_version"] = 3
    (root / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="schema_version"):
        load_bundle(root)
