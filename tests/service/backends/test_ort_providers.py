"""service/backends/ort_providers.py: what ONNX Runtime is asked for (model file, precision, provider list, TensorRT
provider options, cache directories), checked without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.backends.ort_providers import (
    ort_trt_cache_dirs,
    provider_list,
    select_onnx_model,
    trt_provider_options,
)
from service.backends.trt_build import BatchProfile
from service.core.bundle import OnnxSpec
from service.core.errors import BackendUnavailable

WITH_FP16 = OnnxSpec(opset=17, fp16_file="model.fp16.onnx")
NO_FP16 = OnnxSpec(opset=17)
INT8_FAST = OnnxSpec(opset=17, int8_file="model.int8.onnx", cpu_precisions=["int8", "fp32"])
INT8_SLOW = OnnxSpec(opset=17, int8_file="model.int8.onnx", cpu_precisions=["fp32", "int8"])


def test_trt_provider_options(tmp_path: Path) -> None:
    opts = trt_provider_options(
        device_id=1,
        input_name="images",
        input_chw=(3, 640, 480),
        profile=BatchProfile(1, 8, 8),
        fp16=True,
        engine_dir=tmp_path / "engines",
        timing_dir=tmp_path / "timing",
    )
    assert opts == {
        "device_id": 1,
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path / "engines"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(tmp_path / "timing"),
        "trt_profile_min_shapes": "images:1x3x640x480",
        "trt_profile_opt_shapes": "images:8x3x640x480",
        "trt_profile_max_shapes": "images:8x3x640x480",
    }


def test_trt_provider_options_fixed_batch_fp32(tmp_path: Path) -> None:
    opts = trt_provider_options(
        device_id=0,
        input_name="x",
        input_chw=(3, 64, 64),
        profile=None,
        fp16=False,
        engine_dir=tmp_path,
        timing_dir=tmp_path,
    )
    assert opts["trt_fp16_enable"] is False
    assert not any(k.startswith("trt_profile_") for k in opts)


def test_provider_lists() -> None:
    trt = {"device_id": 2, "trt_fp16_enable": True}
    assert provider_list("cpu", device_id=2) == ["CPUExecutionProvider"]
    assert provider_list("cuda", device_id=2) == [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]
    assert provider_list("tensorrt", device_id=2, trt_options=trt) == [
        ("TensorrtExecutionProvider", trt),
        ("CUDAExecutionProvider", {"device_id": 2}),
        "CPUExecutionProvider",
    ]


@pytest.mark.parametrize(
    ("provider", "requested", "onnx", "file", "precision"),
    [
        ("cuda", "auto", WITH_FP16, "model.fp16.onnx", "fp16"),
        ("cuda", "auto", NO_FP16, "model.onnx", "fp32"),
        ("cuda", "fp16", WITH_FP16, "model.fp16.onnx", "fp16"),
        ("cuda", "fp32", WITH_FP16, "model.onnx", "fp32"),
        ("cpu", "auto", WITH_FP16, "model.onnx", "fp32"),  # never FP16 on CPU unless asked
        ("cpu", "auto", NO_FP16, "model.onnx", "fp32"),
        ("cpu", "fp16", WITH_FP16, "model.fp16.onnx", "fp16"),
        ("cpu", "fp32", WITH_FP16, "model.onnx", "fp32"),
        ("tensorrt", "auto", WITH_FP16, "model.onnx", "fp16"),  # TensorRT makes its own FP16 from the fp32 graph
        ("tensorrt", "auto", NO_FP16, "model.onnx", "fp16"),
        ("tensorrt", "fp16", NO_FP16, "model.onnx", "fp16"),
        ("tensorrt", "fp32", WITH_FP16, "model.onnx", "fp32"),
        ("cpu", "auto", INT8_FAST, "model.int8.onnx", "int8"),  # the fastest measured CPU precision
        ("cpu", "auto", INT8_SLOW, "model.onnx", "fp32"),  # INT8 measured slower than fp32 on the export machine
        ("cpu", "int8", INT8_SLOW, "model.int8.onnx", "int8"),
        ("cpu", "fp32", INT8_FAST, "model.onnx", "fp32"),
        ("cuda", "auto", INT8_FAST, "model.onnx", "fp32"),  # INT8 QDQ is a CPU model here
        ("tensorrt", "auto", INT8_FAST, "model.onnx", "fp16"),
    ],
)
def test_select_onnx_model(provider: str, requested: str, onnx: OnnxSpec, file: str, precision: str) -> None:
    choice = select_onnx_model(onnx, provider, requested)  # type: ignore[arg-type]
    assert (choice.file, choice.precision) == (file, precision)
    assert choice.reason


@pytest.mark.parametrize("provider", ["cuda", "cpu"])
def test_fp16_without_fp16_file_is_a_clear_error(provider: str) -> None:
    with pytest.raises(BackendUnavailable, match=r"no FP16 ONNX .*onnx\.fp16_file.*aoi export --fp16-onnx"):
        select_onnx_model(NO_FP16, provider, "fp16")  # type: ignore[arg-type]


def test_ort_trt_cache_dirs_key_everything_that_invalidates_an_engine(tmp_path: Path) -> None:
    base = {
        "onnx_sha256": "ab" * 32,
        "gpu_name": "NVIDIA L4",
        "compute_capability": "8.9",
        "runtime_version": "onnxruntime 1.31.0 + TensorRT 10.13.0",
        "profile": BatchProfile(1, 8, 8),
        "fp16": True,
    }
    engine, timing = ort_trt_cache_dirs(tmp_path, **base)  # type: ignore[arg-type]
    assert engine.parent == tmp_path / "ort-trt" and timing.parent == tmp_path / "ort-trt"
    assert ort_trt_cache_dirs(tmp_path, **base) == (engine, timing)  # type: ignore[arg-type]
    changes = {
        "onnx_sha256": "cd" * 32,
        "gpu_name": "NVIDIA A100",
        "compute_capability": "8.0",
        "runtime_version": "onnxruntime 1.31.1 + TensorRT 10.13.0",
        "profile": BatchProfile(1, 4, 4),
        "fp16": False,
    }
    for key, value in changes.items():
        other_engine, other_timing = ort_trt_cache_dirs(tmp_path, **{**base, key: value})  # type: ignore[arg-type]
        assert other_engine != engine, f"engine dir ignores {key}"
        model_only = key in ("onnx_sha256", "profile", "fp16")
        assert (other_timing == timing) == model_only, f"timing dir and {key}"


def test_int8_without_int8_file_names_the_export_flag() -> None:
    with pytest.raises(BackendUnavailable, match=r"no INT8 ONNX .*onnx\.int8_file.*aoi export --int8"):
        select_onnx_model(NO_FP16, "cpu", "int8")


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_int8_is_refused_on_gpu_providers(provider: str) -> None:
    with pytest.raises(BackendUnavailable, match=rf"int8 is served on CPU .*not by the {provider} provider"):
        select_onnx_model(INT8_FAST, provider, "int8")  # type: ignore[arg-type]


@pytest.mark.parametrize(("int8_file", "precisions"), [(None, ["int8", "fp32"]), ("model.int8.onnx", ["fp32"])])
def test_cpu_precisions_list_int8_exactly_with_its_file(int8_file: str | None, precisions: list[str]) -> None:
    with pytest.raises(ValueError, match=r"onnx\.cpu_precisions lists int8 exactly when onnx\.int8_file is set"):
        OnnxSpec(opset=17, int8_file=int8_file, cpu_precisions=precisions)  # type: ignore[arg-type]
