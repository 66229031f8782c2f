"""OpenVINO backend on the synthetic model: fp32 matches ONNX Runtime, the precision hint is really set, compiled models
are cached and reused, ``auto`` picks it when importable and falls back to ONNX Runtime when not, and bf16 is refused
on a CPU without BF16."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import service.backends.openvino_backend as ovb
from service.backends import load_backend
from service.backends.openvino_backend import OpenVinoBackend
from service.backends.ort_backend import OrtBackend
from service.core.bundle import ModelBundle, load_bundle
from service.core.errors import BackendUnavailable
from tests.synthetic import make_synthetic_bundle, synthetic_output

pytest.importorskip("openvino", reason="the cpu extra installs openvino")

# fp32 vs ONNX Runtime fp32: same arithmetic, other kernels. The synthetic model's outputs are 0-1 means and fixed
# boxes; measured differences are ~1e-7, so 1e-5 fails on any real precision change (bf16 moves them by ~1e-3).
FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def conv_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """The synthetic model with a real convolution in it (bf16 and thread layouts have something to compute)."""
    return load_bundle(make_synthetic_bundle(tmp_path_factory.mktemp("ovconv"), extra_convs=1, max_batch=4))


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, 3, 64, 64), dtype=np.float32)


@pytest.mark.parametrize("batch_shapes", ["static", "dynamic"])
def test_fp32_matches_onnxruntime(conv_bundle: ModelBundle, tmp_path: Path, batch_shapes: str) -> None:
    backend = OpenVinoBackend(
        conv_bundle, precision="fp32", max_batch_size=3, streams=2, threads=2, cache_root=tmp_path,
        batch_shapes=batch_shapes,  # type: ignore[arg-type]
    )  # fmt: skip
    ort = OrtBackend(conv_bundle, max_batch_size=3)
    assert backend.batch_sizes == (1, 2, 3) and backend.precision == "fp32" and backend.kind == "openvino"
    for b in backend.batch_sizes:
        x = _x(b, seed=b)
        out = backend.infer(x)
        np.testing.assert_allclose(out, ort.infer(x), atol=FP32_ATOL)
        np.testing.assert_allclose(out, synthetic_output(x, conv_bundle.nc), atol=FP32_ATOL)
    assert set(backend.warmup()) == {1, 2, 3}
    backend.close()
    ort.close()


def test_precision_hint_is_set_and_read_back(conv_bundle: ModelBundle, tmp_path: Path) -> None:
    backend = OpenVinoBackend(conv_bundle, precision="fp32", streams=2, threads=2, cache_root=tmp_path)
    assert ovb._hint_name(backend.compiled_property("INFERENCE_PRECISION_HINT")) == "f32"
    assert int(backend.compiled_property("NUM_STREAMS")) == 2
    assert int(backend.compiled_property("INFERENCE_NUM_THREADS")) == 2
    backend.close()


def test_streams_run_concurrent_batches(conv_bundle: ModelBundle, tmp_path: Path) -> None:
    backend = OpenVinoBackend(
        conv_bundle, precision="fp32", max_batch_size=2, streams=2, threads=2, cache_root=tmp_path
    )
    xs = [_x(2, seed=s) for s in range(8)]
    with ThreadPoolExecutor(2) as pool:  # two slots: each result must belong to its own input
        outs = list(pool.map(backend.infer, xs))
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out, synthetic_output(x, conv_bundle.nc), atol=FP32_ATOL)
    backend.close()


def test_compiled_models_are_cached_and_reused(conv_bundle: ModelBundle, tmp_path: Path) -> None:
    first = OpenVinoBackend(conv_bundle, precision="fp32", max_batch_size=2, cache_root=tmp_path)
    assert not first.cache_hit and first.cache_dir is not None
    assert first.cache_dir.parent == tmp_path and first.cache_dir.name.startswith("fp32-")
    blobs = sorted(p.name for p in first.cache_dir.iterdir())
    assert len(blobs) == 2  # one compiled model per served batch size (1, 2)
    first.close()
    second = OpenVinoBackend(conv_bundle, precision="fp32", max_batch_size=2, cache_root=tmp_path)
    assert second.cache_hit and second.cache_dir == first.cache_dir
    assert sorted(p.name for p in second.cache_dir.iterdir()) == blobs  # read, nothing recompiled
    np.testing.assert_allclose(second.infer(_x(1)), synthetic_output(_x(1), conv_bundle.nc), atol=FP32_ATOL)
    second.close()


def test_cache_key_changes_with_the_model(conv_bundle: ModelBundle, bundle: ModelBundle, tmp_path: Path) -> None:
    a = OpenVinoBackend(conv_bundle, precision="fp32", max_batch_size=1, cache_root=tmp_path)
    b = OpenVinoBackend(bundle, precision="fp32", max_batch_size=1, cache_root=tmp_path)
    assert a.cache_dir != b.cache_dir and not b.cache_hit
    a.close()
    b.close()


def test_cache_inside_the_bundle_is_refused(conv_bundle: ModelBundle) -> None:
    assert conv_bundle.root is not None
    with pytest.raises(BackendUnavailable, match=r"openvino_cache .* is inside the bundle.*AOI_OPENVINO_CACHE"):
        OpenVinoBackend(conv_bundle, precision="fp32", cache_root=conv_bundle.root / "cache")


def test_bf16_refused_without_cpu_support(
    conv_bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda core: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    with pytest.raises(BackendUnavailable, match=r"precision bf16 requested, but .* has no BF16.*AOI_PRECISION"):
        load_backend("openvino", conv_bundle, precision="bf16", engine_cache=tmp_path)


def test_bf16_runs_where_the_cpu_has_it_and_is_refused_where_the_hint_is_ignored(
    conv_bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the CPU has BF16 the hint must read back as bf16. Where it has not, claiming it has (patched capability
    list) must still fail: OpenVINO ignores the hint there, and the read-back catches that."""
    import openvino as ov

    if "BF16" in ovb.cpu_capabilities(ov.Core()):
        backend = OpenVinoBackend(conv_bundle, precision="bf16", cache_root=tmp_path)
        assert backend.precision == "bf16"
        assert ovb._hint_name(backend.compiled_property("INFERENCE_PRECISION_HINT")) == "bf16"
        np.testing.assert_allclose(backend.infer(_x(1)), synthetic_output(_x(1), conv_bundle.nc), atol=2e-2)
        backend.close()
        return
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda core: ["FP32", "INT8", "BF16"])
    with pytest.raises(BackendUnavailable, match=r"precision hint f32, not bf16 as asked"):
        OpenVinoBackend(conv_bundle, precision="bf16", cache_root=tmp_path)


def test_int8_without_int8_file_names_the_export_flag(conv_bundle: ModelBundle, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match=r"openvino\.int8_file is not set.*aoi export --int8"):
        load_backend("openvino", conv_bundle, precision="int8", engine_cache=tmp_path)


def test_bf16_is_refused_by_onnxruntime(bundle: ModelBundle) -> None:
    with pytest.raises(BackendUnavailable, match=r"onnxruntime-cpu does not serve precision bf16 \(only openvino"):
        load_backend("onnxruntime-cpu", bundle, precision="bf16")


def test_int8_on_onnxruntime_needs_the_bundles_int8_onnx(bundle: ModelBundle) -> None:
    with pytest.raises(BackendUnavailable, match=r"no INT8 ONNX .*aoi export --int8"):
        load_backend("onnxruntime-cpu", bundle, precision="int8")


def test_auto_takes_onnxruntime_on_cpu_and_openvino_only_for_its_own_precisions(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    choice = load_backend("auto", bundle, max_batch_size=2, engine_cache=tmp_path)
    if choice.backend.kind in ("tensorrt", "onnxruntime-trt", "onnxruntime-cuda"):
        pytest.skip(f"a GPU backend runs here ({choice.backend.kind}); auto prefers it")
    # measured on this AVX2 CPU: OpenVINO fp32 is no faster than ONNX Runtime, so auto keeps ONNX Runtime
    assert choice.backend.kind == "onnxruntime-cpu" and choice.backend.precision == "fp32"
    choice.backend.close()
    # int8 without INT8 files: auto tries ONNX Runtime CPU, then OpenVINO, and says why each cannot serve it
    with pytest.raises(BackendUnavailable) as info:
        load_backend("auto", bundle, max_batch_size=2, engine_cache=tmp_path, precision="int8")
    assert "onnxruntime-cpu: precision int8 requested, but the bundle has no INT8 ONNX" in str(info.value)
    assert "openvino: " in str(info.value) and "openvino.int8_file is not set" in str(info.value)
    with pytest.raises(BackendUnavailable, match=r"onnxruntime-cuda does not serve precision bf16"):
        load_backend("onnxruntime-cuda", bundle, precision="bf16")


def test_openvino_without_the_package_is_a_clear_error(
    bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    assert ovb.openvino_unavailable_reason() is not None
    with pytest.raises(BackendUnavailable, match="openvino is not installed"):
        load_backend("openvino", bundle, engine_cache=tmp_path)
    choice = load_backend("auto", bundle, max_batch_size=2, engine_cache=tmp_path)
    assert choice.backend.kind != "openvino"
    choice.backend.close()


def test_unreadable_model_is_a_clear_error(bundle: ModelBundle, tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.onnx").write_bytes(b"not a model")
    broken = bundle.model_copy(update={"root": tmp_path / "b"})
    with pytest.raises(BackendUnavailable, match=r"model\.onnx: OpenVINO cannot read the model"):
        OpenVinoBackend(broken, precision="fp32", cache_root=tmp_path / "cache")


def test_settings_choose_the_cache_folder(bundle: ModelBundle, tmp_path: Path) -> None:
    from service.backends import backend_from_settings
    from service.settings import Settings

    own = backend_from_settings(Settings(backend="openvino", openvino_cache=tmp_path / "ov"), bundle).backend
    assert getattr(own, "cache_dir", Path()).parent == tmp_path / "ov"
    default = backend_from_settings(Settings(backend="openvino", engine_cache=tmp_path / "ec"), bundle).backend
    assert getattr(default, "cache_dir", Path()).parent == tmp_path / "ec" / "openvino"
    own.close()
    default.close()


def _ranked(bundle: ModelBundle, ranking: list[tuple[str, str]], ov_precisions: list[str]) -> ModelBundle:
    """``bundle`` with a measured CPU ranking (as export writes it) and OpenVINO precisions to match."""
    from service.core.bundle import CpuChoice, OpenVinoSpec

    return bundle.model_copy(update={
        "openvino": OpenVinoSpec(precisions=ov_precisions),  # type: ignore[arg-type]
        "cpu_ranking": [CpuChoice(backend=b, precision=p) for b, p in ranking],  # type: ignore[arg-type]
    })  # fmt: skip


def test_auto_serves_the_first_entry_of_the_bundles_cpu_ranking(conv_bundle: ModelBundle, tmp_path: Path) -> None:
    ranked = _ranked(conv_bundle, [("openvino", "fp32"), ("onnxruntime-cpu", "fp32")], ["fp32"])
    choice = load_backend("auto", ranked, max_batch_size=2, engine_cache=tmp_path)
    if choice.backend.kind in ("tensorrt", "onnxruntime-trt", "onnxruntime-cuda"):
        pytest.skip(f"a GPU backend runs here ({choice.backend.kind}); auto prefers it")
    assert (choice.backend.kind, choice.backend.precision) == ("openvino", "fp32")
    assert "#1 of the bundle's measured cpu_ranking" in choice.reason
    choice.backend.close()
    # the ranking decides between the CPU runtimes, not only their precision: reversed, ONNX Runtime serves
    reversed_ = _ranked(conv_bundle, [("onnxruntime-cpu", "fp32"), ("openvino", "fp32")], ["fp32"])
    choice = load_backend("auto", reversed_, max_batch_size=2, engine_cache=tmp_path, precision="fp32")
    assert choice.backend.kind == "onnxruntime-cpu" and "#1 of the bundle's measured cpu_ranking" in choice.reason


def test_auto_skips_a_ranked_bf16_on_a_cpu_without_it(
    conv_bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda core: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    ranked = _ranked(conv_bundle, [("openvino", "bf16"), ("onnxruntime-cpu", "fp32"), ("openvino", "fp32")],
                     ["bf16", "fp32"])  # fmt: skip
    choice = load_backend("auto", ranked, max_batch_size=2, engine_cache=tmp_path)
    if choice.backend.kind in ("tensorrt", "onnxruntime-trt", "onnxruntime-cuda"):
        pytest.skip(f"a GPU backend runs here ({choice.backend.kind}); auto prefers it")
    assert (choice.backend.kind, choice.backend.precision) == ("onnxruntime-cpu", "fp32")
    assert "#2 of the bundle's measured cpu_ranking" in choice.reason
    assert "skipped" in choice.reason and "openvino bf16: precision bf16 requested, but" in choice.reason


def test_auto_candidates_order() -> None:
    from service.backends import auto_candidates
    from service.core.bundle import CpuChoice

    ranking = [CpuChoice(backend="openvino", precision="bf16"), CpuChoice(backend="onnxruntime-cpu", precision="int8")]

    class _B:
        cpu_ranking = ranking

    kinds = [(k, p) for k, p, _ in auto_candidates(_B(), "auto")]  # type: ignore[arg-type]
    assert kinds == [("tensorrt", "auto"), ("onnxruntime-trt", "auto"), ("onnxruntime-cuda", "auto"),
                     ("openvino", "bf16"), ("onnxruntime-cpu", "int8"),
                     ("onnxruntime-cpu", "auto"), ("openvino", "auto")]  # fmt: skip
    kinds = [(k, p) for k, p, _ in auto_candidates(_B(), "int8")]  # type: ignore[arg-type]
    assert kinds[3:] == [("onnxruntime-cpu", "int8"), ("onnxruntime-cpu", "int8"), ("openvino", "int8")]
