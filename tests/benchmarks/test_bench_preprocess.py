"""benchmarks/bench_preprocess.py runs end to end on the synthetic bundle and its uint8 conversion (figures not
checked: only that every row is measured and the JSON is written)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks.bench_preprocess import main
from export.uint8_input import Uint8InputOptions, run_uint8_input
from tests.synthetic import make_synthetic_bundle


def test_bench_preprocess_smoke(tmp_path: Path) -> None:
    src = make_synthetic_bundle(tmp_path / "float")
    u8 = tmp_path / "u8"
    run_uint8_input(Uint8InputOptions(src, u8))
    out = tmp_path / "bench.json"
    args = ["--bundle", str(src), "--u8-bundle", str(u8), "--rounds", "1", "--seconds", "0.01", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["fill_input"]["uint8 NHWC"]["cpu_us"] > 0 and report["fill_input"]["float32 NCHW"]["wall_us"] > 0
    rows = report["backend"]
    assert rows["onnxruntime fp32 batch 1"]["uint8"]["wall_ms_per_image"] > 0
    if importlib.util.find_spec("openvino") is not None:
        assert rows["openvino fp32 batch 8"]["float"]["cpu_ms_per_image"] >= 0
    with pytest.raises(SystemExit):
        main(["--bundle", str(u8), "--u8-bundle", str(src)])
