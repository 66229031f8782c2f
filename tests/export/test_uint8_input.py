"""``aoi export --from-bundle DIR --uint8-input``: the input normalisation moved into the ONNX graph.

Parity of the uint8 NHWC graph vs the float NCHW graph on the same letterboxed images. The graph computes the same
float32 input as ``service.core.preprocess`` (Cast, Mul by the same float32 scale, Sub/Div in numpy's order), so
ONNX Runtime must answer identical outputs (tolerance 0). OpenVINO may fold the scale into the first convolution's
weights, which changes float rounding only: its fp32 outputs of the two graphs must agree within 1e-4 px on boxes
and 1e-5 on scores (scores and boxes of an untrained yolo11n at 64 px; measured ~1e-5 px / ~1e-7).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest

from aoi.cli import main
from export.pipeline import ExportError
from export.samples import SampleSet, synthetic_images
from export.uint8_input import Uint8InputOptions, run_uint8_input, uint8_input_graph, uint8_input_spec
from service.core.bundle import (
    BUNDLE_FILE,
    InputSpec,
    ModelBundle,
    OpenVinoSpec,
    load_bundle,
    sha256_file,
    write_bundle,
)
from service.core.preprocess import letterbox, to_input
from tests.synthetic import make_synthetic_bundle, make_synthetic_onnx


def _ort(path: Path | onnx.ModelProto, x: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    import onnxruntime as ort

    src = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0], np.float32)


def _boxed(spec: InputSpec, count: int = 4) -> list[npt.NDArray[np.uint8]]:
    size = (spec.height, spec.width)
    return [letterbox(im, size, spec.pad_value)[0] for im in synthetic_images(count, seed=3)]


@pytest.mark.parametrize(
    "spec",
    [InputSpec(width=64, height=64), InputSpec(width=64, height=64, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))],
    ids=["scale", "mean-std"],
)
def test_graph_takes_uint8_nhwc_and_answers_the_same(tmp_path: Path, spec: InputSpec) -> None:
    path = make_synthetic_onnx(tmp_path / "m.onnx", extra_convs=1)
    converted = uint8_input_graph(onnx.load(str(path)), spec)
    inp = converted.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", 64, 64, 3]
    meta = {p.key: p.value for p in converted.metadata_props}
    assert InputSpec.model_validate_json(meta["input_spec"]) == uint8_input_spec(spec)
    ops = [n.op_type for n in converted.graph.node[:5]]
    assert ops[:3] == ["Transpose", "Cast", "Mul"] and (ops[3:5] == ["Sub", "Div"]) == bool(any(spec.mean))
    boxed = _boxed(spec)
    ref = _ort(path, to_input(boxed, spec))
    assert np.array_equal(_ort(converted, to_input(boxed, uint8_input_spec(spec))), ref)  # exact: same float input


def test_graph_refusals(tmp_path: Path) -> None:
    path = make_synthetic_onnx(tmp_path / "m.onnx")
    model, spec = onnx.load(str(path)), InputSpec(width=64, height=64)
    with pytest.raises(ValueError, match="no input 'pixels'"):
        uint8_input_graph(model, spec.model_copy(update={"name": "pixels"}))
    with pytest.raises(ValueError, match=r"shape \[None, 3, 64, 64\], bundle.json says \[B, 3, 96, 64\]"):
        uint8_input_graph(model, InputSpec(width=64, height=96))
    with pytest.raises(ValueError, match="already uint8 NHWC"):
        uint8_input_graph(model, uint8_input_spec(spec))
    with pytest.raises(ValueError, match="is UINT8, not FLOAT"):
        uint8_input_graph(uint8_input_graph(model, spec), spec)


def test_bundle_conversion(tmp_path: Path) -> None:
    src = make_synthetic_bundle(tmp_path / "src", fp16=True)
    before = {p.name: sha256_file(p) for p in src.iterdir()}
    rc = main(["export", "--from-bundle", str(src), "--out", str(tmp_path / "u8"), "--uint8-input", "--quiet"])
    assert rc == 0
    assert {p.name: sha256_file(p) for p in src.iterdir()} == before  # the source is untouched
    bundle = load_bundle(tmp_path / "u8")  # every file hashed
    assert (bundle.schema_version, bundle.version, bundle.input.layout, bundle.input.dtype) == (2, "1.0.0-u8", "NHWC",
                                                                                                "uint8")  # fmt: skip
    assert bundle.provenance["uint8_input"]["from_version"] == "1.0.0" and not list(tmp_path.glob(".*partial"))
    parity = json.loads((tmp_path / "u8" / "parity.json").read_text())
    models = {k: c for k, c in parity["comparisons"].items() if k.startswith("uint8_input_vs_float_input:")}
    assert set(models) == {"uint8_input_vs_float_input:model.onnx", "uint8_input_vs_float_input:model.fp16.onnx"}
    assert all(m["raw"]["box_max_abs"] == 0.0 and m["raw"]["score_max_abs"] == 0.0 for m in models.values())
    assert parity["passed"]


def test_bundle_conversion_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_synthetic_bundle(tmp_path / "src")
    out = tmp_path / "u8"
    run_uint8_input(Uint8InputOptions(src, out, version="2.0"))
    assert load_bundle(out).version == "2.0"
    with pytest.raises(ExportError, match="already uint8 NHWC") as exc:
        run_uint8_input(Uint8InputOptions(out, tmp_path / "again"))
    assert exc.value.code == 2
    assert main(["export", "--from-bundle", str(src), "--out", str(out), "--uint8-input", "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", "--from-bundle", str(src), "--out", str(tmp_path / "x"), "--uint8-input", "--int8"]) == 2
    assert "--uint8-input converts an existing bundle" in capsys.readouterr().err
    bundle = load_bundle(src)
    (src / "model.int8.xml").write_text("<net/>")
    (src / "model.int8.bin").write_bytes(b"")
    write_bundle(bundle.model_copy(update={"openvino": OpenVinoSpec(int8_file="model.int8.xml")}), src)
    with pytest.raises(ExportError, match="OpenVINO INT8 IR is not ONNX: this step cannot give it a uint8 input"):
        run_uint8_input(Uint8InputOptions(src, tmp_path / "ir"))


def _with_ort_int8(root: Path) -> ModelBundle:
    """The exported bundle at ``root`` plus a static QDQ INT8 ONNX (as ``aoi export --int8`` writes it)."""
    from export.ort_int8 import ORT_INT8_FILE, quantize_ort_int8

    bundle = load_bundle(root)
    samples = SampleSet.synthetic(bundle.input, count=4)
    quantize_ort_int8(root / "model.onnx", root / ORT_INT8_FILE, samples, "images", subset=4)
    onnx_spec = bundle.onnx.model_copy(update={"int8_file": ORT_INT8_FILE, "cpu_precisions": ["int8", "fp32"]})
    write_bundle(bundle.model_copy(update={"onnx": onnx_spec}), root)
    return load_bundle(root)


@pytest.mark.slow
def test_exported_yolo_with_int8_on_ort_and_openvino(yolo11n_ckpt: Path, tmp_path: Path) -> None:
    """A real exported graph (yolo11n, untrained, 64 px) and its QDQ INT8: ONNX Runtime exact, OpenVINO FP32 close."""
    src, out = tmp_path / "b", tmp_path / "u8"
    assert main(["export", "--weights", str(yolo11n_ckpt), "--out", str(src), "--quiet", "--max-batch", "2"]) == 0
    float_bundle = _with_ort_int8(src)
    assert main(["export", "--from-bundle", str(src), "--out", str(out), "--uint8-input", "--quiet"]) == 0
    u8 = load_bundle(out)
    boxed = _boxed(float_bundle.input)
    x_float, x_u8 = to_input(boxed, float_bundle.input), to_input(boxed, u8.input)
    for name in ("model.onnx", "model.int8.onnx"):
        assert np.array_equal(_ort(out / name, x_u8), _ort(src / name, x_float)), name
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    outs = []
    for root, x in ((src, x_float), (out, x_u8)):
        compiled = core.compile_model(
            core.read_model(str(root / "model.onnx")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
        outs.append(np.asarray(compiled(x)[0], np.float32))
    assert np.abs(outs[0][:, :4] - outs[1][:, :4]).max() <= 1e-4
    assert np.abs(outs[0][:, 4:] - outs[1][:, 4:]).max() <= 1e-5
    assert (out / BUNDLE_FILE).is_file()


def test_cpu_precisions_are_not_added_to_a_converted_bundle(
    tmp_path: Path, voc_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("openvino")
    src = make_synthetic_bundle(tmp_path / "src")
    run_uint8_input(Uint8InputOptions(src, tmp_path / "u8"))
    argv = ["export", "--from-bundle", str(tmp_path / "u8"), "--out", str(tmp_path / "x"), "--bf16", "--quiet"]
    assert main([*argv, "--calibrate-data", str(voc_data)]) == 2
    assert "take uint8 NHWC pixels: add --int8 / --bf16 to the float bundle" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
