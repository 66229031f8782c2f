"""TensorRT build helpers: the parts that need no TensorRT (profiles, cache keys, records, mismatch), plus a
real build marked ``gpu``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.backends.trt_build import (
    BatchProfile,
    BuildRecord,
    EngineMismatch,
    build_engine,
    check_engine_compatible,
    engine_cache_key,
    tensorrt_unavailable_reason,
)


def _record(**kw: object) -> BuildRecord:
    base: dict[str, object] = {
        "tensorrt_version": "10.3.0",
        "gpu_name": "NVIDIA L4",
        "compute_capability": "8.9",
        "precision": "fp16",
        "profiles": [BatchProfile(1, 4, 16)],
        "onnx_sha256": "ab" * 32,
        "input_name": "images",
        "input_shape_chw": (3, 640, 640),
        "built_at": "2025-01-01T00:00:00+00:00",
    }
    base.update(kw)
    return BuildRecord(**base)  # type: ignore[arg-type]


def test_profile_shapes_and_validation() -> None:
    p = BatchProfile(1, 4, 16)
    assert p.shapes((3, 640, 640)) == ((1, 3, 640, 640), (4, 3, 640, 640), (16, 3, 640, 640))
    assert p.covers(16) and not p.covers(17)
    for bad in ((0, 1, 1), (2, 1, 4), (1, 8, 4)):
        with pytest.raises(ValueError, match="min <= opt <= max"):
            BatchProfile(*bad)


def test_cache_key_is_stable_and_sensitive() -> None:
    args = ("ab" * 32, "NVIDIA L4", "8.9", "10.3.0", BatchProfile(1, 4, 16), "fp16")
    key = engine_cache_key(*args)
    assert key == engine_cache_key(*args) and len(key) == 24
    for i, other in enumerate(("cd" * 32, "NVIDIA A10", "8.6", "10.4.0", BatchProfile(1, 8, 16), "fp32")):
        changed = list(args)
        changed[i] = other
        assert engine_cache_key(*changed) != key, f"key ignores argument {i}"


def test_record_json_round_trip(tmp_path: Path) -> None:
    rec = _record(extra={"workspace_mib": 2048})
    assert BuildRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    rec.save(tmp_path / "engine.json")
    assert BuildRecord.load(tmp_path / "engine.json") == rec


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("gpu_name", 3, "gpu_name"),
        ("profiles", [], "profiles"),
        ("profiles", [{"min": 4, "opt": 1, "max": 8}], "profiles"),
        ("input_shape_chw", [3, 640], "input_shape_chw"),
        ("format", "other", "format"),
    ],
)
def test_record_from_json_names_bad_field(field: str, value: object, message: str) -> None:
    d = _record().to_json()
    d[field] = value
    with pytest.raises(ValueError, match=message):
        BuildRecord.from_json(d)


def test_record_load_names_file(tmp_path: Path) -> None:
    path = tmp_path / "engine.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"engine\.json"):
        BuildRecord.load(path)


def test_mismatch_detection() -> None:
    rec = _record()
    check_engine_compatible(rec, gpu_name="NVIDIA L4", compute_capability="8.9", tensorrt_version="10.3.0")
    with pytest.raises(EngineMismatch, match=r"TensorRT 10\.3\.0"):
        check_engine_compatible(rec, gpu_name="NVIDIA L4", compute_capability="8.9", tensorrt_version="10.4.0")
    with pytest.raises(EngineMismatch, match="compute capability"):
        check_engine_compatible(rec, gpu_name="NVIDIA L4", compute_capability="9.0", tensorrt_version="10.3.0")
    with pytest.raises(EngineMismatch, match="GPU"):
        check_engine_compatible(rec, gpu_name="NVIDIA A10", compute_capability="8.9", tensorrt_version="10.3.0")


def test_unavailable_reason_is_a_sentence_or_none() -> None:
    reason = tensorrt_unavailable_reason()
    assert reason is None or ("TensorRT" in reason or "GPU" in reason)


@pytest.mark.gpu
def test_real_engine_build(tmp_path: Path) -> None:
    reason = tensorrt_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from tests.synthetic import make_synthetic_bundle

    bundle = make_synthetic_bundle(tmp_path / "b", size=64, max_batch=4)
    cache = tmp_path / "timing.cache"
    data, rec = build_engine(bundle / "model.onnx", profile=BatchProfile(1, 2, 4), timing_cache=cache)
    assert data and cache.is_file() and rec.profiles == [BatchProfile(1, 2, 4)]
    _, rec2 = build_engine(bundle / "model.onnx", profile=BatchProfile(1, 2, 4), timing_cache=cache)
    assert rec2.extra["timing_cache_reused"] is True
