"""``aoi export --int8`` / ``--bf16`` and ``--from-bundle``: NNCF INT8 for OpenVINO and ONNX Runtime's QDQ INT8 on
tiny synthetic data, hashed and served by their backends; BF16 and INT8 mAP deltas in parity.json; a precision beyond
its bound refuses the export (exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aoi.cli import main
from service.core.bundle import load_bundle, sha256_file

pytest.importorskip("nncf", reason="the train extra installs nncf")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory, yolo11n_ckpt: Path, voc_data: Path) -> Path:
    out = tmp_path_factory.mktemp("int8") / "bundle"
    rc = main(["export", "--weights", str(yolo11n_ckpt), "--out", str(out), "--quiet", "--max-batch", "2",
               "--calibrate-data", str(voc_data), "--int8"])  # fmt: skip
    assert rc == 0
    return out


def test_int8_export_writes_hashed_ir_and_measured_deltas(int8_bundle: Path) -> None:
    bundle = load_bundle(int8_bundle)  # verifies every sha256, the .bin included
    assert bundle.openvino is not None and bundle.openvino.int8_file == "model.int8.xml"
    for name in ("model.int8.xml", "model.int8.bin"):
        assert bundle.files[name] == sha256_file(int8_bundle / name)
    assert set(bundle.openvino.precisions) == {"fp32", "bf16", "int8"}
    parity = json.loads((int8_bundle / "parity.json").read_text())
    assert parity["passed"]
    for name in ("openvino_fp32_vs_onnx_fp32", "openvino_bf16_vs_onnx_fp32", "openvino_int8_vs_onnx_fp32"):
        m = parity["comparisons"][name]["map"]
        assert m["delta_map50"] == pytest.approx(m["candidate_map50"] - m["reference_map50"])
        assert m["delta_map50_95"] == pytest.approx(m["candidate_map50_95"] - m["reference_map50_95"])
    int8 = parity["comparisons"]["openvino_int8_vs_onnx_fp32"]
    assert int8["tolerance"]["map50_drop_max"] == 0.01
    assert parity["comparisons"]["openvino_bf16_vs_onnx_fp32"]["tolerance"]["map50_drop_max"] == 0.005
    assert int8["raw"]["score_max_abs"] > 0  # really quantised: its outputs differ from fp32
    assert parity["comparisons"]["openvino_fp32_vs_onnx_fp32"]["raw"]["box_max_abs"] < 0.05
    assert parity["cpu_precisions"]["int8"]["attempts"][0]["method"].startswith("nncf ")
    speed = parity["cpu_precisions"]["speed"]
    assert set(speed["images_per_s"]) >= {"openvino:fp32", "openvino:int8", "onnxruntime-cpu:int8"}
    assert bundle.provenance["tools"]["openvino"] and bundle.provenance["tools"]["nncf"]


def test_int8_bundle_is_served_by_openvino(int8_bundle: Path, tmp_path: Path) -> None:
    import openvino as ov

    from service.backends import load_backend
    from service.backends.ort_backend import OrtBackend

    bundle = load_bundle(int8_bundle)
    choice = load_backend("openvino", bundle, precision="int8", max_batch_size=2, engine_cache=tmp_path)
    backend = choice.backend
    assert backend.precision == "int8" and "model.int8.xml" in choice.reason
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    out, ref = backend.infer(x), OrtBackend(bundle, max_batch_size=2, precision="fp32").infer(x)
    assert out.shape == ref.shape and np.isfinite(out).all()
    # int8, not the fp32 ONNX: the IR carries NNCF's FakeQuantize ops. (Outputs may match fp32 to 1e-6 on this
    # untrained model, whose scores sit far from 0, on CPUs with VNNI, so the structure is what is checked.)
    ops = ov.Core().read_model(str(int8_bundle / "model.int8.xml")).get_ops()
    assert sum(op.get_type_name() == "FakeQuantize" for op in ops) > 10
    np.testing.assert_allclose(out[:, 4:], ref[:, 4:], atol=0.25)  # sigmoid scores stay close
    backend.close()


def test_int8_export_writes_onnxruntime_qdq_model(int8_bundle: Path) -> None:
    bundle = load_bundle(int8_bundle)
    assert bundle.onnx.int8_file == "model.int8.onnx"
    assert bundle.files["model.int8.onnx"] == sha256_file(int8_bundle / "model.int8.onnx")
    assert sorted(bundle.onnx.cpu_precisions) == ["fp32", "int8"]
    parity = json.loads((int8_bundle / "parity.json").read_text())
    cmp = parity["comparisons"]["onnx_int8_vs_onnx_fp32"]
    assert cmp["passed"] and cmp["tolerance"]["map50_drop_max"] == 0.01
    assert cmp["map"]["delta_map50"] == pytest.approx(cmp["map"]["candidate_map50"] - cmp["map"]["reference_map50"])
    report = parity["cpu_precisions"]
    assert report["int8_onnxruntime"]["method"].startswith("onnxruntime ") and report["int8_onnxruntime"]["passed"]
    # one ranking over both runtimes, timed side by side, fastest first; the per-runtime lists follow it
    speed = report["speed"]
    rates = [speed["images_per_s"][k] for k in speed["ranking"] if k in speed["images_per_s"]]
    assert rates == sorted(rates, reverse=True)
    ranking = [f"{c.backend}:{c.precision}" for c in bundle.cpu_ranking]
    assert ranking == speed["ranking"] and set(ranking) >= {"onnxruntime-cpu:fp32", "onnxruntime-cpu:int8"}
    assert bundle.onnx.cpu_precisions == [k.split(":")[1] for k in ranking if k.startswith("onnxruntime-cpu:")]
    assert bundle.openvino is not None
    assert bundle.openvino.precisions == [k.split(":")[1] for k in ranking if k.startswith("openvino:")]


def test_onnxruntime_int8_keeps_its_fp32_scope_and_quantises_the_rest(int8_bundle: Path) -> None:
    """The QDQ model has int8 weights (a DequantizeLinear feeding the weight) on every convolution outside the scope
    and fp32 weights on every one inside it (decode, level branches, stem: the first two convolutions)."""
    import onnx

    from export.ort_int8 import fp32_scope

    scope = fp32_scope(onnx.load(str(int8_bundle / "model.onnx")))
    assert len(scope.decode) > 3 and scope.branches
    q = onnx.load(str(int8_bundle / "model.int8.onnx"))
    producer = {t: n for n in q.graph.node for t in n.output}
    convs = [n.name for n in q.graph.node if n.op_type == "Conv"]
    dequantized = {t for t, n in producer.items() if n.op_type == "DequantizeLinear"}
    int8_weights = {n.name for n in q.graph.node if n.op_type == "Conv" and n.input[1] in dequantized}
    kept = set(convs) & set(scope.nodes)
    assert kept and int8_weights and int8_weights == set(convs) - kept
    assert convs[:2] == [n for n in scope.stem if n in kept]


def test_int8_bundle_is_served_by_onnxruntime_cpu(int8_bundle: Path) -> None:
    from service.backends import load_backend
    from service.backends.ort_backend import OrtBackend

    bundle = load_bundle(int8_bundle)
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    ref = OrtBackend(bundle, max_batch_size=2, precision="fp32").infer(x)
    choice = load_backend("onnxruntime-cpu", bundle, precision="int8", max_batch_size=2)
    assert choice.backend.precision == "int8" and "model.int8.onnx" in choice.reason
    out = choice.backend.infer(x)
    assert out.shape == ref.shape and np.isfinite(out).all()
    np.testing.assert_allclose(out[:, 4:], ref[:, 4:], atol=0.25)  # scores are computed in fp32 from int8 features
    assert choice.backend.choice.file == "model.int8.onnx"  # type: ignore[attr-defined]
    auto = load_backend("onnxruntime-cpu", bundle, max_batch_size=2)  # auto: the first of onnx.cpu_precisions
    assert auto.backend.precision == bundle.onnx.cpu_precisions[0]


def test_export_refuses_int8_beyond_its_bound(
    tmp_path: Path,
    yolo11n_ckpt: Path,
    voc_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bound no quantised model meets (mAP50 must rise by 1.0): plain NNCF and its fallback both fail, exit 2, and
    neither the bundle nor its staging folder is left."""
    import export.cli as cli
    from export.cpu_step import CpuPrecisionOptions

    tight = CpuPrecisionOptions(int8=True, int8_map50_drop_max=-1.0)
    monkeypatch.setattr(cli, "_cpu_options", lambda args: tight)
    out = tmp_path / "bundle"
    rc = main(["export", "--weights", str(yolo11n_ckpt), "--out", str(out), "--quiet", "--max-batch", "2",
               "--calibrate-data", str(voc_data), "--int8"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "parity.json: a CPU precision is outside its bound" in err and "mAP50 drop" in err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / ".bundle.partial").exists()
    assert "onnx_int8_vs_onnx_fp32" in err and "openvino_int8_vs_onnx_fp32" in err  # both INT8 models failed


def test_int8_needs_calibration_data(tmp_path: Path, yolo11n_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", "--weights", str(yolo11n_ckpt), "--out", str(tmp_path / "b"), "--quiet", "--int8"])
    assert rc == 2 and "--int8: needs --calibrate-data" in capsys.readouterr().err


def test_from_bundle_adds_precisions_and_keeps_the_rest(tmp_path: Path, int8_bundle: Path, voc_data: Path) -> None:
    source = load_bundle(int8_bundle)
    out = tmp_path / "added"
    rc = main(["export", "--from-bundle", str(int8_bundle), "--out", str(out), "--quiet", "--calibrate-data",
               str(voc_data), "--bf16", "--version", "9.9.9"])  # fmt: skip
    assert rc == 0
    added = load_bundle(out)
    assert added.version == "9.9.9" and added.postprocess == source.postprocess and added.tiling == source.tiling
    assert added.files["model.onnx"] == source.files["model.onnx"]
    assert added.openvino is not None and added.openvino.int8_file is None  # --bf16 only: the old IR is not kept
    assert not (out / "model.int8.xml").exists() and "bf16" in added.openvino.precisions
    assert added.onnx.int8_file is None and not (out / "model.int8.onnx").exists()
    assert {c.precision for c in added.cpu_ranking} == {"fp32", "bf16"}
    record = added.provenance["cpu_precisions_added"]
    assert record["from_version"] == source.version and record["options"]["source"] == int8_bundle.name
    parity = json.loads((out / "parity.json").read_text())
    assert "onnx_fp32_vs_torch_fp32" in parity["comparisons"] and "openvino_bf16_vs_onnx_fp32" in parity["comparisons"]
    # the INT8 models are gone, and with them their comparisons (a listed comparison is a model in the bundle)
    assert not {"openvino_int8_vs_onnx_fp32", "onnx_int8_vs_onnx_fp32"} & set(parity["comparisons"])


def test_decode_subgraph_is_the_yolo_head_tail(int8_bundle: Path) -> None:
    """The fallback's fp32 scope starts at the three per-level concats of raw prediction convolutions (P3-P5) and
    ends at the output."""
    import openvino as ov

    from export.cpu_precisions import decode_subgraph

    starts, ends = decode_subgraph(ov.Core().read_model(str(int8_bundle / "model.onnx")))
    assert len(starts) == 3 and all("Concat" in s for s in starts)
    assert ends == ["output0"]


def test_bf16_emulation_rounds_like_bf16(int8_bundle: Path) -> None:
    """On a CPU without BF16 the emulated runner moves the outputs by bfloat16 rounding (about 3 significant digits),
    not by nothing and not by garbage. (The untrained test model's scores barely move: its class logits are far
    from 0, so the boxes, which pass through the DFL convolution, carry the difference.)"""
    from export.cpu_precisions import OvRunner, bf16_runner

    runner, method = bf16_runner(int8_bundle / "model.onnx")
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    ref = OvRunner(str(int8_bundle / "model.onnx"), hint="f32", label="fp32")(x)
    out = runner(x)
    diff = float(np.abs(out - ref).max())
    rel = diff / float(np.abs(ref).max())
    if method.startswith("emulated"):
        assert diff > 0 and rel < 0.05
    else:
        assert rel < 0.05 and runner.hint == "bf16"


def test_from_bundle_needs_calibration_data(
    int8_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["export", "--from-bundle", str(int8_bundle), "--out", str(tmp_path / "b"), "--int8", "--quiet"])
    assert rc == 2 and "--from-bundle: needs --calibrate-data" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
