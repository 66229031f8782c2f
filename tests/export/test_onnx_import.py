"""Bring your own model: Ultralytics ONNX files wrapped by `aoi export --onnx`, Ultralytics best.pt through
`aoi export --weights`; both bundles served by the service and scored by `aoi val`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from aoi.cli import main
from export.onnx_import import inspect_onnx, parse_metadata
from service.core.bundle import load_bundle
from tests.export.test_pipeline import _serve_one

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parents[1] / "fixtures" / "ultralytics"
REAL_ONNX = FIXTURES / "yolo11n-nc2.onnx"  # Ultralytics 8.4 export, dynamic batch/height/width, imgsz 64
NAMES = ["dent", "scratch"]
META = {"task": "detect", "stride": "32", "imgsz": "[64, 64]", "names": "{0: 'dent', 1: 'scratch'}"}


def _tiny_detect_onnx(path: Path, nc: int, batch: int | str, metadata: dict[str, str], side: int = 64) -> Path:
    """A three-level stand-in for an Ultralytics detection graph: ``images [B,3,s,s] -> output0 [B,4+nc,A]``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, levels = [], [], []
    for s in (8, 16, 32):
        w = numpy_helper.from_array(rng.normal(0, 0.1, (4 + nc, 3, s, s)).astype(np.float32), f"w{s}")
        inits.append(w)
        nodes += [
            helper.make_node("Conv", ["images", f"w{s}"], [f"c{s}"], strides=[s, s]),
            helper.make_node("Reshape", [f"c{s}", "flat"], [f"r{s}"]),
        ]
        levels.append(f"r{s}")
    inits.append(numpy_helper.from_array(np.array([0, 4 + nc, -1], dtype=np.int64), "flat"))
    nodes.append(helper.make_node("Concat", levels, ["raw"], axis=2))
    nodes.append(helper.make_node("Sigmoid", ["raw"], ["output0"]))  # scores in (0, 1), as a real head's
    anchors = sum((side // s) ** 2 for s in (8, 16, 32))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, side, side])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, 4 + nc, anchors])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def _nms_onnx(path: Path) -> Path:
    """An end-to-end export's signature: ``[1, 300, 6]`` (x1, y1, x2, y2, score, class) after NMS."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ConstantOfShape", ["shape"], ["output0"])
    shape = onnx.numpy_helper.from_array(np.array([1, 300, 6], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [node],
        "nms",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 300, 6])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in {**META, "args": "{'nms': True, 'batch': 1}"}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def test_metadata_literals_dict_and_list_names() -> None:
    assert parse_metadata(META)["names"] == NAMES
    listed = parse_metadata({**META, "names": "['dent', 'scratch']", "imgsz": "64", "batch": "4"})
    assert listed["names"] == NAMES and listed["imgsz"] == (64, 64) and listed["batch"] == 4
    assert parse_metadata({**META, "args": "{'nms': True}"})["nms"] is True


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ({"task": "detect"}, "no 'names'"),
        ({**META, "task": "segment"}, "task 'segment'"),
        ({**META, "names": "__import__('os').system('false')"}, "not a Python literal"),  # parsed, never evaluated
        ({**META, "names": "{0: 'a', 2: 'b'}"}, "names' must be"),
        ({**META, "imgsz": "[64]"}, "imgsz' must be"),
    ],
)
def test_bad_metadata_is_refused(meta: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_metadata(meta)


def test_real_ultralytics_export_is_read() -> None:
    facts = inspect_onnx(REAL_ONNX)
    assert facts.names == NAMES and (facts.height, facts.width) == (64, 64)
    assert facts.dynamic_batch and facts.num_anchors == 84 and facts.opset >= 11
    assert (facts.input_name, facts.output_name, facts.input_dtype) == ("images", "output0", "float32")


def test_static_dynamic_nms_and_class_count(tmp_path: Path) -> None:
    static = inspect_onnx(_tiny_detect_onnx(tmp_path / "static.onnx", 2, 1, {**META, "batch": "1"}))
    assert not static.dynamic_batch and static.num_anchors == 84
    assert inspect_onnx(_tiny_detect_onnx(tmp_path / "dyn.onnx", 2, "batch", META)).dynamic_batch
    with pytest.raises(ValueError, match="already after NMS"):
        inspect_onnx(_nms_onnx(tmp_path / "nms.onnx"))
    three = {**META, "names": "['a', 'b', 'c']"}
    with pytest.raises(ValueError, match=r"3 class names need \[B, 4\+nc=7, A=84\]"):
        inspect_onnx(_tiny_detect_onnx(tmp_path / "mismatch.onnx", 2, "batch", three))
    with pytest.raises(ValueError, match="static batch axis of 4"):
        inspect_onnx(_tiny_detect_onnx(tmp_path / "b4.onnx", 2, 4, META))
    with pytest.raises(ValueError, match="fixed at 64x64"):
        inspect_onnx(_tiny_detect_onnx(tmp_path / "fixed.onnx", 2, 1, META), imgsz=128)


@pytest.fixture(scope="module")
def dent_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.train.conftest import make_voc_dataset

    return make_voc_dataset(tmp_path_factory.mktemp("voc"), 2, 6, size=80, classes=NAMES)


def _val(bundle: Path, data: Path, tmp_path: Path) -> dict[str, object]:
    out = tmp_path / "metrics.json"
    assert main(["val", "--model", str(bundle), "--data", str(data), "--batch", "2", "--json", str(out)]) == 0
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_export_onnx_real_file_is_served_and_scored(
    tmp_path: Path, dent_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b"
    args = ["export", "--onnx", str(REAL_ONNX), "--out", str(out), "--calibrate-data", str(dent_data), "--quiet"]
    assert main([*args, "--max-batch", "4"]) == 0
    assert "dynamic batch axis, served up to max batch 4" in capsys.readouterr().out
    bundle = load_bundle(out)
    assert bundle.classes == NAMES and bundle.architecture == "ultralytics-onnx" and bundle.onnx.max_batch == 4
    assert (out / "model.onnx").read_bytes() == REAL_ONNX.read_bytes()  # served as it is
    prov = bundle.provenance
    assert prov["source_onnx"] == REAL_ONNX.name and len(prov["source_sha256"]) == 64
    assert prov["imported_from"]["version"].startswith("8.") and "/" not in json.dumps(prov["export_options"])
    assert bundle.calibration is not None and set(bundle.calibration["per_class"]) == set(NAMES)
    served = asyncio.run(_serve_one(out))
    assert served["info"]["name"] == bundle.name  # type: ignore[index]
    metrics = _val(out, dent_data, tmp_path)
    assert 0.0 <= float(metrics["map50"]) <= 1.0  # type: ignore[arg-type]


def test_export_onnx_static_batch_is_served_at_batch_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    described = {**META, "batch": "1", "description": "Ultralytics YOLO11n model trained on /home/me/pcb/data.yaml"}
    static = _tiny_detect_onnx(tmp_path / "static.onnx", 2, 1, described)
    out = tmp_path / "b"
    assert main(["export", "--onnx", str(static), "--out", str(out), "--quiet"]) == 0
    assert (
        "static batch axis of 1 in the ONNX file: the bundle serves one image per inference" in capsys.readouterr().out
    )
    bundle = load_bundle(out)
    assert not bundle.onnx.dynamic_batch and bundle.onnx.max_batch == 1
    assert "max batch 1" in bundle.provenance["served_batch"]
    assert bundle.provenance["imported_from"]["description"] == "Ultralytics YOLO11n model trained on data.yaml"
    served = asyncio.run(_serve_one(out))
    assert served["info"]["max_batch_size"] == 1  # type: ignore[index]


def test_export_onnx_refusals_are_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nms = _nms_onnx(tmp_path / "e2e.onnx")
    cases = [
        (["--onnx", str(nms)], "e2e.onnx: output [1, 300, 6] is already after NMS"),
        (["--onnx", str(tmp_path / "none.onnx")], "none.onnx: ONNX file not found"),
        (["--onnx", str(REAL_ONNX), "--engine"], "--engine: not available with --onnx"),
    ]
    for extra, message in cases:
        assert main(["export", *extra, "--out", str(tmp_path / "b"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit) as info:  # argparse: one source only
        main(["export", "--onnx", str(REAL_ONNX), "--weights", str(REAL_ONNX), "--out", str(tmp_path / "b")])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_export_weights_ultralytics_checkpoint_is_served_and_scored(tmp_path: Path, dent_data: Path) -> None:
    out = tmp_path / "b"
    pt = FIXTURES / "yolov8n-nc2.pt"
    args = ["export", "--weights", str(pt), "--out", str(out), "--calibrate-data", str(dent_data), "--quiet"]
    assert main([*args, "--max-batch", "2"]) == 0
    bundle = load_bundle(out)
    assert bundle.architecture == "yolov8n" and bundle.classes == NAMES and bundle.input.width == 64
    assert bundle.provenance["imported_from"]["format"] == "ultralytics"
    assert bundle.provenance["source_checkpoint"] == pt.name
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["comparisons"]["onnx_fp32_vs_torch_fp32"]["passed"]
    served = asyncio.run(_serve_one(out))
    assert served["info"]["name"] == bundle.name  # type: ignore[index]
    assert 0.0 <= float(_val(out, dent_data, tmp_path)["map50"]) <= 1.0  # type: ignore[arg-type]
