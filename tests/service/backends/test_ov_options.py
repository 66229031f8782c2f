"""What the OpenVINO backend asks for, without OpenVINO: precision and file per request and CPU, compile properties,
the cache folder key."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.backends.ov_options import compile_properties, ov_cache_dir, select_ov_model
from service.core.bundle import ModelBundle, OpenVinoSpec
from service.core.errors import BackendUnavailable

AVX2 = ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]
AVX512_BF16 = ["FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"]


def _with(bundle: ModelBundle, spec: OpenVinoSpec | None) -> ModelBundle:
    return bundle.model_copy(update={"openvino": spec})


@pytest.mark.parametrize(
    ("precisions", "int8", "caps", "want"),
    [
        (["bf16", "int8", "fp32"], "model.int8.xml", AVX512_BF16, ("bf16", "model.onnx", "bf16")),
        (["bf16", "int8", "fp32"], "model.int8.xml", AVX2, ("int8", "model.int8.xml", "f32")),
        (["bf16", "fp32"], None, AVX2, ("fp32", "model.onnx", "f32")),
        (["int8", "fp32"], None, AVX2, ("fp32", "model.onnx", "f32")),  # listed, but no file: never served
        (["fp32"], "model.int8.xml", AVX512_BF16, ("fp32", "model.onnx", "f32")),  # int8 failed its bound
    ],
)
def test_auto_takes_the_first_measured_precision_the_cpu_runs(
    bundle: ModelBundle, precisions: list[str], int8: str | None, caps: list[str], want: tuple[str, str, str]
) -> None:
    spec = OpenVinoSpec(int8_file=int8, precisions=precisions)  # type: ignore[arg-type]
    choice = select_ov_model(_with(bundle, spec), "auto", caps, "Test CPU")
    assert (choice.precision, choice.file, choice.hint) == want
    if "bf16" in precisions and "BF16" not in caps:
        assert "bf16 needs a CPU with BF16 (Test CPU has" in choice.reason


def test_auto_without_measured_precisions_is_fp32(bundle: ModelBundle) -> None:
    choice = select_ov_model(_with(bundle, None), "auto", AVX512_BF16)
    assert (choice.precision, choice.hint) == ("fp32", "f32") and "measured no other" in choice.reason


def test_explicit_precisions(bundle: ModelBundle) -> None:
    b = _with(bundle, OpenVinoSpec(int8_file="model.int8.xml", precisions=["int8", "fp32"]))
    assert select_ov_model(b, "fp32", AVX512_BF16).hint == "f32"
    assert select_ov_model(b, "bf16", AVX512_BF16).hint == "bf16"  # explicit bf16 needs no measurement
    assert select_ov_model(b, "int8", AVX2).file == "model.int8.xml"
    with pytest.raises(BackendUnavailable, match=r"Test CPU has no BF16 \(OpenVINO OPTIMIZATION_CAPABILITIES: FP32"):
        select_ov_model(b, "bf16", AVX2, "Test CPU")
    with pytest.raises(BackendUnavailable, match="not served by OpenVINO"):
        select_ov_model(b, "fp16", AVX2)


def test_compile_properties_always_name_the_precision(bundle: ModelBundle, tmp_path: Path) -> None:
    choice = select_ov_model(bundle, "fp32", AVX512_BF16)
    props = compile_properties(choice, streams=2, threads=2, cache_dir=tmp_path)
    assert props == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2,
                     "INFERENCE_NUM_THREADS": 2, "CACHE_DIR": str(tmp_path)}  # fmt: skip
    one = compile_properties(choice, streams=1, threads=4, cache_dir=None)
    assert one["PERFORMANCE_HINT"] == "LATENCY" and "CACHE_DIR" not in one


def test_cache_folder_key(tmp_path: Path) -> None:
    def key(**kw: str) -> Path:
        args = {"model_sha256": "a" * 64, "runtime_version": "2026.4.1", "cpu_name": "CPU X", "precision": "fp32"}
        return ov_cache_dir(tmp_path, **{**args, **kw})  # type: ignore[arg-type]

    base = key()
    assert base.parent == tmp_path and base.name.startswith("fp32-") and key() == base
    others = [key(model_sha256="b" * 64), key(runtime_version="2026.5.0"), key(cpu_name="CPU Y"),
              key(precision="bf16")]  # fmt: skip
    assert len({base, *others}) == 5
