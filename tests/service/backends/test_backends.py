"""Backends: ONNX Runtime CPU matches the known synthetic outputs (fp32 and the FP16 ONNX); auto's order and the
reasons it logs; GPU backends import cleanly and report unavailable with a reason where there is no GPU; real GPU
runs are marked ``gpu``."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import service.backends as backends
from service.backends import AUTO_ORDER, load_backend, unavailable_reasons
from service.backends.ort_backend import OrtBackend
from service.core.bundle import ModelBundle, load_bundle
from service.core.errors import BackendUnavailable
from tests.service.conftest import FakeBackend
from tests.synthetic import make_synthetic_bundle, synthetic_output

GPU_KINDS = ("tensorrt", "onnxruntime-trt", "onnxruntime-cuda")


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return load_bundle(make_synthetic_bundle(tmp_path_factory.mktemp("fp16"), fp16=True))


def test_ort_cpu_matches_synthetic_reference(bundle: ModelBundle) -> None:
    backend = OrtBackend(bundle, max_batch_size=3)
    assert backend.batch_sizes == (1, 2, 3) and backend.device == "cpu" and backend.precision == "fp32"
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(backend.infer(x), synthetic_output(x, bundle.nc), atol=1e-5)
    assert set(backend.warmup()) == {1, 2, 3}
    backend.close()


def test_ort_cpu_serves_the_fp16_onnx_when_asked(fp16_bundle: ModelBundle) -> None:
    backend = OrtBackend(fp16_bundle, max_batch_size=2, precision="fp16")
    assert backend.precision == "fp16" and backend.choice.file == "model.fp16.onnx"
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    out = backend.infer(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, synthetic_output(x, fp16_bundle.nc), atol=2e-3)
    backend.close()


def test_auto_precision_keeps_fp32_on_cpu(fp16_bundle: ModelBundle) -> None:
    choice = load_backend("onnxruntime-cpu", fp16_bundle, max_batch_size=2)
    assert choice.backend.precision == "fp32" and "precision fp32" in choice.reason and "CPU" in choice.reason
    choice.backend.close()


@pytest.mark.parametrize("kind", ["onnxruntime-cpu", "auto"])
def test_fp16_requested_without_fp16_file(bundle: ModelBundle, kind: str) -> None:
    if kind == "auto" and any(r is None for k, r in unavailable_reasons().items() if k in GPU_KINDS):
        pytest.skip("a GPU backend can run here: auto would serve FP16 through TensorRT")
    with pytest.raises(BackendUnavailable, match=r"onnx\.fp16_file is not set.*aoi export --fp16-onnx"):
        load_backend(kind, bundle, precision="fp16")


def test_auto_picks_an_available_backend_and_says_why(bundle: ModelBundle, tmp_path: Path) -> None:
    choice = load_backend("auto", bundle, max_batch_size=2, engine_cache=tmp_path)
    reasons = unavailable_reasons()
    assert list(reasons) == list(AUTO_ORDER)
    assert choice.backend.kind in reasons and reasons[choice.backend.kind] is None
    if choice.backend.kind in ("openvino", "onnxruntime-cpu"):
        assert "skipped tensorrt" in choice.reason
        for kind in GPU_KINDS:  # each skipped one, in order, with its reason
            assert f"{kind}: " in choice.reason
        positions = [choice.reason.index(f"{k}: ") for k in GPU_KINDS]
        assert positions == sorted(positions)
    choice.backend.close()


def test_auto_order_and_logged_reasons(
    bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tried: list[str] = []
    why = {
        "tensorrt": "TensorRT is not installed",
        "onnxruntime-trt": "onnxruntime-trt: ONNX Runtime fell back to CUDA (session providers [...])",
        "onnxruntime-cuda": "onnxruntime 1.31 has no CUDAExecutionProvider",
        "openvino": "openvino is not installed",
    }

    def fake_load(kind: str, b: ModelBundle, opts: object) -> FakeBackend:
        tried.append(kind)
        if kind in why:
            raise BackendUnavailable(why[kind])
        return FakeBackend(b)

    monkeypatch.setattr(backends, "_load_one", fake_load)
    with caplog.at_level(logging.INFO, logger="service.backends"):
        choice = load_backend("auto", bundle)
    # ONNX Runtime CPU before OpenVINO: OpenVINO fp32 measured no faster on this CPU (docs/service.md)
    assert tried == ["tensorrt", "onnxruntime-trt", "onnxruntime-cuda", "onnxruntime-cpu"]
    assert isinstance(choice.backend, FakeBackend)
    assert choice.reason.startswith(
        "auto: onnxruntime-cpu, the best available CPU runtime (skipped tensorrt: TensorRT is not"
    )
    skips = {r.getMessage().split(":")[1].strip().removeprefix("skipping "): r.levelno for r in caplog.records
             if "skipping" in r.getMessage()}  # fmt: skip
    assert skips == {"tensorrt": logging.INFO, "onnxruntime-trt": logging.WARNING, "onnxruntime-cuda": logging.INFO}


@pytest.mark.parametrize(
    ("cores", "requested", "instances", "threads"),
    [(2, 0, 2, 1), (8, 0, 2, 4), (1, 0, 1, 1), (8, 4, 4, 2), (2, 3, 3, 1)],
)
def test_cpu_instances_split_the_cores(
    bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch, cores: int, requested: int, instances: int, threads: int
) -> None:
    monkeypatch.setattr(backends, "cpu_cores", lambda: cores)
    choice = load_backend("onnxruntime-cpu", bundle, max_batch_size=2, instances=requested)
    assert choice.instances == instances and choice.backend.intra_op_threads == threads  # type: ignore[attr-defined]
    assert choice.backend.sessions == instances  # type: ignore[attr-defined]
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(choice.backend.infer(x), synthetic_output(x, bundle.nc), atol=1e-5)
    choice.backend.close()


def test_ort_instances_run_on_their_own_sessions(bundle: ModelBundle) -> None:
    backend = load_backend("onnxruntime-cpu", bundle, max_batch_size=2, instances=2).backend
    free = backend._free  # type: ignore[attr-defined]
    sessions = [free.get(), free.get()]
    assert sessions[0] is not sessions[1] and free.empty()
    used: list[int] = []
    both_inside = threading.Barrier(2, timeout=5)

    def recording(session: Any, index: int) -> Any:
        run = session.run

        def wrapped(*args: Any, **kw: Any) -> Any:
            used.append(index)
            if concurrent:
                both_inside.wait()  # only passes when two calls are inside run() at once
            return run(*args, **kw)

        return wrapped

    concurrent = False
    for i, s in enumerate(sessions):
        s.run = recording(s, i)
        free.put(s)
    backend.warmup()
    assert sorted(used) == [0, 0, 1, 1]  # each session warmed at both batch sizes (1, 2)
    concurrent = True
    x = np.random.default_rng(2).random((1, 3, 64, 64), dtype=np.float32)
    with ThreadPoolExecutor(2) as pool:  # a shared session would serialise these and break the barrier
        outs = list(pool.map(backend.infer, [x, x]))
    for out in outs:
        np.testing.assert_allclose(out, synthetic_output(x, bundle.nc), atol=1e-5)
    backend.close()


def test_instances_explicit_threads_and_gpu_default(bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "cpu_cores", lambda: 8)
    choice = load_backend("onnxruntime-cpu", bundle, instances=2, intra_op_threads=3)
    assert choice.backend.intra_op_threads == 3  # type: ignore[attr-defined]
    choice.backend.close()
    assert backends.resolve_instances("tensorrt", 0, cores=16) == 1
    assert backends.resolve_instances("onnxruntime-cuda", 2, cores=16) == 2


def test_instances_capped_by_a_single_threaded_backend(
    bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backends, "_load_one", lambda kind, b, opts: FakeBackend(b))  # no max_instances: 1
    with caplog.at_level(logging.WARNING, logger="service.backends"):
        choice = load_backend("onnxruntime-cpu", bundle, instances=4)
    assert choice.instances == 1 and "instances 4 -> 1" in caplog.text


def test_unknown_kind(bundle: ModelBundle) -> None:
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        load_backend("openvino-gpu", bundle)


def test_gpu_backends_report_unavailable_with_reason(bundle: ModelBundle, tmp_path: Path) -> None:
    reasons = unavailable_reasons()
    for kind in GPU_KINDS:
        if reasons[kind] is None:
            continue  # this machine has it: covered by the gpu-marked tests
        assert len(reasons[kind] or "") > 10
        with pytest.raises(BackendUnavailable, match=kind):
            load_backend(kind, bundle, engine_cache=tmp_path)


def test_corrupt_onnx_is_a_clear_error(bundle: ModelBundle, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    broken = bundle.model_copy(update={"root": tmp_path})
    with pytest.raises(BackendUnavailable, match=r"model\.onnx: ONNX Runtime cannot load"):
        OrtBackend(broken)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["onnxruntime-cuda", "onnxruntime-trt", "tensorrt"])
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


@pytest.mark.gpu
def test_ort_cuda_auto_serves_the_fp16_onnx(fp16_bundle: ModelBundle) -> None:
    reason = unavailable_reasons()["onnxruntime-cuda"]
    if reason is not None:
        pytest.skip(reason)
    backend = load_backend("onnxruntime-cuda", fp16_bundle, max_batch_size=2).backend
    assert backend.precision == "fp16"
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(backend.infer(x), synthetic_output(x, fp16_bundle.nc), atol=2e-2)
    backend.close()


@pytest.mark.gpu
def test_ort_trt_reuses_its_engine_cache(bundle: ModelBundle, tmp_path: Path) -> None:
    reason = unavailable_reasons()["onnxruntime-trt"]
    if reason is not None:
        pytest.skip(reason)
    first = load_backend("onnxruntime-trt", bundle, max_batch_size=2, engine_cache=tmp_path).backend
    first.warmup()
    first.close()
    cached = sorted(p.name for p in (tmp_path / "ort-trt").rglob("*") if p.is_file())
    assert any(n.endswith(".engine") for n in cached), cached
    second = load_backend("onnxruntime-trt", bundle, max_batch_size=2, engine_cache=tmp_path).backend
    assert second.precision == "fp16" and set(second.warmup()) == {1, 2}
    assert sorted(p.name for p in (tmp_path / "ort-trt").rglob("*") if p.is_file()) == cached
    second.close()


def test_cgroup_cpu_quota_v2_v1_and_none(tmp_path: Path) -> None:
    v2, v1, none = tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    none.mkdir()
    (none / "cpu.max").write_text("max 100000\n")
    assert backends.cgroup_cpu_quota(v2) == 2 and backends.cgroup_cpu_quota(v1) == 2
    assert backends.cgroup_cpu_quota(none) is None and backends.cgroup_cpu_quota(tmp_path / "missing") is None
    assert backends.cpu_cores(v2) <= 2 and backends.cpu_cores(none) >= 1
