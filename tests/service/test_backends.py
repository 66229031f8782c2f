"""Backends: ONNX Runtime CPU matches the known synthetic outputs; GPU backends import cleanly and report
unavailable with a reason where there is no GPU; real GPU runs are marked ``gpu``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.backends import load_backend, unavailable_reasons
from service.backends.ort_backend import OrtBackend
from service.bundle import ModelBundle
from service.errors import BackendUnavailable
from tests.synthetic import synthetic_output


def test_ort_cpu_matches_synthetic_reference(bundle: ModelBundle) -> None:
    backend = OrtBackend(bundle, cuda=False, max_batch_size=3)
    assert backend.batch_sizes == (1, 2, 3) and backend.device == "cpu" and backend.precision == "fp32"
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(backend.infer(x), synthetic_output(x, bundle.nc), atol=1e-5)
    assert set(backend.warmup()) == {1, 2, 3}
    backend.close()


def test_auto_picks_an_available_backend_and_says_why(bundle: ModelBundle) -> None:
    choice = load_backend("auto", bundle, max_batch_size=2)
    reasons = unavailable_reasons()
    assert choice.backend.kind in reasons and reasons[choice.backend.kind] is None
    if choice.backend.kind == "onnxruntime-cpu":
        assert "skipped tensorrt" in choice.reason
    choice.backend.close()


def test_unknown_kind(bundle: ModelBundle) -> None:
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        load_backend("openvino", bundle)


def test_gpu_backends_report_unavailable_with_reason(bundle: ModelBundle, tmp_path: Path) -> None:
    reasons = unavailable_reasons()
    for kind in ("tensorrt", "onnxruntime-cuda"):
        if reasons[kind] is None:
            continue  # this machine has it: covered by the gpu-marked tests
        assert len(reasons[kind] or "") > 10
        with pytest.raises(BackendUnavailable, match=kind):
            load_backend(kind, bundle, engine_cache=tmp_path)


def test_corrupt_onnx_is_a_clear_error(bundle: ModelBundle, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    broken = bundle.model_copy(update={"root": tmp_path})
    with pytest.raises(BackendUnavailable, match=r"model\.onnx: ONNX Runtime cannot load"):
        OrtBackend(broken, cuda=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["onnxruntime-cuda", "tensorrt"])
def test_gpu_backend_matches_reference(bundle: ModelBundle, kind: str, tmp_path: Path) -> None:
    reason = unavailable_reasons()[kind]
    if reason is not None:
        pytest.skip(reason)
    backend = load_backend(kind, bundle, max_batch_size=4, engine_cache=tmp_path).backend
    x = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
    tol = 2e-2 if backend.precision == "fp16" else 1e-4
    np.testing.assert_allclose(backend.infer(x), synthetic_output(x, bundle.nc), atol=tol)
    assert set(backend.warmup()) == set(backend.batch_sizes)
    backend.close()
