"""The full HTTP path in-process: synthetic ONNX model on ONNX Runtime CPU, known outputs, bad-input table, metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.backends import cpu_cores, resolve_instances
from service.core.errors import BackendUnavailable
from service.settings import Settings
from tests.service.conftest import FakeBackend, serve
from tests.synthetic import encode_image, make_image_bytes, make_synthetic_bundle

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _red_patch(width: int = 128, height: int = 96) -> tuple[bytes, tuple[int, int, int, int]]:
    img = np.zeros((height, width, 3), np.uint8)
    box = (32, 16, 80, 64)
    img[box[1] : box[3], box[0] : box[2], 0] = 255
    return encode_image(img, "png"), box


async def test_inspect_red_patch_on_onnxruntime(bundle_dir: Path) -> None:
    settings = Settings(bundle=bundle_dir, backend="onnxruntime-cpu", max_delay_ms=0)
    async with serve(settings) as client:
        data, (x1, y1, x2, y2) = _red_patch()
        r = await client.post(
            "/v1/inspect?camera_id=cam1&part_id=p9",
            content=data,
            headers={"content-type": "image/png", "x-request-id": "abc"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers["x-request-id"] == "abc" and body["request_id"] == "abc"
        assert (body["width"], body["height"], body["camera_id"], body["part_id"]) == (128, 96, "cam1", "p9")
        assert body["verdict"] == "NG" and body["model_name"] == "synthetic"
        dets = body["detections"]
        assert dets and {d["class_name"] for d in dets} == {"scratch"}
        # Cells fully inside the patch score 1.0; every surviving box centre lies inside the patch.
        assert max(d["score"] for d in dets) == pytest.approx(1.0)
        for d in dets:
            bx1, by1, bx2, by2 = d["box_xyxy"]
            assert x1 <= (bx1 + bx2) / 2 <= x2 and y1 <= (by1 + by2) / 2 <= y2
            assert 0 <= bx1 < bx2 <= 128 and 0 <= by1 < by2 <= 96
        assert set(body["timings_ms"]) == {"decode", "queue", "inference", "postprocess", "merge", "total"}
        assert body["tiling"] == {"tiled": False, "tiles": 1, "batches": 1}  # the synthetic bundle has no native scale

        black = encode_image(np.zeros((40, 60, 3), np.uint8), "bmp")
        r = await client.post("/v1/inspect", content=black, headers={"content-type": "image/bmp"})
        assert r.status_code == 200 and r.json()["verdict"] == "OK" and r.json()["detections"] == []


async def test_model_info_and_health(bundle_dir: Path) -> None:
    settings = Settings(bundle=bundle_dir, backend="onnxruntime-cpu", max_batch_size=4, score_thresholds={"dent": 0.9})
    async with serve(settings) as client:
        info = (await client.get("/v1/model")).json()
        assert info["backend"] == "onnxruntime-cpu" and info["device"] == "cpu"
        assert info["batch_sizes"] == [1, 2, 3, 4] and set(info["warmup_ms"]) == {"1", "2", "3", "4"}
        assert info["score_thresholds"] == {"scratch": 0.5, "dent": 0.9}
        assert info["files"] and info["classes"] == ["scratch", "dent"]
        # auto on onnxruntime-cpu: no waiting for partial batches; instances and threads split the cores
        instances = resolve_instances("onnxruntime-cpu", 0)
        assert info["max_delay_ms"] == 0.0 and info["instances"] == instances
        assert info["intra_op_threads"] == max(1, cpu_cores() // instances)
        for path in ("/healthz", "/v2/health/live"):
            assert (await client.get(path)).json()["status"] == "ok"
        for path in ("/readyz", "/v2/health/ready"):
            r = await client.get(path)
            assert r.status_code == 200 and r.json()["status"] == "ready"
        schema = (await client.get("/openapi.json")).json()
        assert "/v1/inspect" in schema["paths"] and "ModelInfo" in schema["components"]["schemas"]


@pytest.mark.parametrize(("precision", "expected"), [("auto", "fp32"), ("fp16", "fp16")])
async def test_precision_in_use_is_reported(tmp_path: Path, precision: str, expected: str) -> None:
    root = make_synthetic_bundle(tmp_path / "b", fp16=True)
    settings = Settings(bundle=root, backend="onnxruntime-cpu", precision=precision, max_batch_size=2)  # type: ignore[arg-type]
    async with serve(settings) as client:
        info = (await client.get("/v1/model")).json()
        assert info["precision"] == expected and f"precision {expected}" in info["backend_reason"]
        metrics = (await client.get("/metrics")).text
        assert re.search(rf'aoi_model_info\{{[^}}]*backend="onnxruntime-cpu"[^}}]*precision="{expected}"', metrics)
        red, _ = _red_patch()
        r = await client.post("/v1/inspect", content=red, headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["verdict"] == "NG"


async def test_fp16_without_fp16_onnx_fails_startup(bundle_dir: Path) -> None:
    settings = Settings(bundle=bundle_dir, backend="onnxruntime-cpu", precision="fp16")
    with pytest.raises(BackendUnavailable, match="no FP16 ONNX"):
        async with serve(settings):
            pass


async def test_multipart_several_images(bundle: object) -> None:
    backend = FakeBackend(bundle)  # type: ignore[arg-type]
    async with serve(Settings(max_delay_ms=50), bundle=bundle, backend=backend) as client:
        red, _ = _red_patch()
        files = [
            ("images", ("a.png", red, "image/png")),
            ("images", ("b.jpg", make_image_bytes(70, 50, "jpeg", channels=1), "image/jpeg")),
            ("images", ("c.tiff", make_image_bytes(30, 30, "tiff", dtype=np.uint16), "image/tiff")),
        ]
        r = await client.post("/v1/inspect", files=files)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["filename"] for x in results] == ["a.png", "b.jpg", "c.tiff"]
        assert [(x["width"], x["height"]) for x in results] == [(128, 96), (70, 50), (30, 30)]
        assert results[0]["verdict"] == "NG" and results[0]["batch_size"] == 3
        assert backend.calls[-1] == 3


def _png_header(width: int, height: int) -> bytes:
    import struct

    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    )


BAD_INPUTS = [
    ("empty", b"", "image/jpeg", 400, "empty_body", "empty_body"),
    ("not-image", b"GIF89a not supported", "image/png", 422, "invalid_image", "invalid_image"),
    ("truncated", make_image_bytes(64, 64, "jpeg")[:400], "image/jpeg", 422, "truncated_image", "invalid_image"),
    (
        "content-type",
        make_image_bytes(8, 8, "png"),
        "text/plain",
        415,
        "unsupported_media_type",
        "unsupported_media_type",
    ),
    ("no-content-type", make_image_bytes(8, 8, "png"), "", 415, "unsupported_media_type", "unsupported_media_type"),
    ("too-large-body", b"\xff\xd8\xff" + b"\0" * 5000, "image/jpeg", 413, "payload_too_large", "payload_too_large"),
    ("bomb", _png_header(50_000, 50_000) + b"IEND", "image/png", 413, "image_too_large", "image_too_large"),
    ("zero-size", _png_header(0, 5) + b"IEND", "image/png", 422, "zero_size_image", "invalid_image"),
]


@pytest.mark.parametrize(
    ("data", "ctype", "status", "code", "reason"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
async def test_bad_input_table(bundle: object, data: bytes, ctype: str, status: int, code: str, reason: str) -> None:
    settings = Settings(max_upload_bytes=4096, max_image_pixels=1_000_000)
    async with serve(settings, bundle=bundle, backend=FakeBackend(bundle)) as client:  # type: ignore[arg-type]
        headers = {"content-type": ctype} if ctype else {}
        r = await client.post("/v1/inspect", content=data, headers=headers)
        assert r.status_code == status, r.text
        body = r.json()
        assert body["code"] == code and body["message"] and body["request_id"] == r.headers["x-request-id"]
        assert "Traceback" not in r.text
        metrics = (await client.get("/metrics")).text
        assert f'aoi_requests_rejected_total{{reason="{reason}"}} 1.0' in metrics


async def test_multipart_without_images_part(bundle: object) -> None:
    async with serve(Settings(), bundle=bundle, backend=FakeBackend(bundle)) as client:  # type: ignore[arg-type]
        r = await client.post("/v1/inspect", files=[("photo", ("a.png", make_image_bytes(8, 8, "png"), "image/png"))])
        assert r.status_code == 400 and "'images'" in r.json()["message"]
        r = await client.get("/nope")
        assert r.status_code == 404 and r.json()["code"] == "not_found"


async def test_metrics_present_and_moving(bundle: object) -> None:
    async with serve(Settings(), bundle=bundle, backend=FakeBackend(bundle)) as client:  # type: ignore[arg-type]
        before = (await client.get("/metrics")).text
        for name in (
            "aoi_request_duration_seconds", "aoi_stage_duration_seconds", "aoi_batch_size", "aoi_queue_depth",
            "aoi_inflight_requests", "aoi_images_processed_total", "aoi_throughput_images_per_second",
            "aoi_requests_rejected_total", "aoi_requests_timed_out_total", "aoi_requests_failed_total",
            "aoi_verdicts_total", "aoi_detections_total", "aoi_model_info", "aoi_ready",
        ):  # fmt: skip
            assert f"# TYPE {name.removesuffix('_total')}" in before, name
        assert "aoi_ready 1.0" in before
        assert 'aoi_model_info{architecture="synthetic-avgpool",backend="fake",device="cpu",name="synthetic"' in before
        red, _ = _red_patch()
        for _ in range(3):
            r = await client.post("/v1/inspect", content=red, headers={"content-type": "image/png"})
            assert r.status_code == 200
        after = (await client.get("/metrics")).text
        assert "aoi_images_processed_total 3.0" in after
        assert 'aoi_verdicts_total{verdict="NG"} 3.0' in after
        assert re.search(r'aoi_detections_total\{class_name="scratch"\} [1-9]', after)
        assert 'aoi_request_duration_seconds_count{route="/v1/inspect",status="200"} 3.0' in after
        assert 'aoi_stage_duration_seconds_count{stage="inference"} 3.0' in after
        assert 'le="0.0075"' in after and 'aoi_batch_size_bucket{le="12.0"}' in after
        rate = float(re.search(r"^aoi_throughput_images_per_second (\S+)$", after, re.M).group(1))  # type: ignore[union-attr]
        assert rate > 0


async def test_backend_failure_is_500_and_service_keeps_serving(bundle: object) -> None:
    backend = FakeBackend(bundle)  # type: ignore[arg-type]
    async with serve(Settings(max_delay_ms=0), bundle=bundle, backend=backend) as client:
        backend.fail_when = lambda x: True
        r = await client.post(
            "/v1/inspect", content=make_image_bytes(16, 16, "png"), headers={"content-type": "image/png"}
        )
        assert (
            r.status_code == 500
            and r.json()["code"] == "backend_error"
            and "simulated GPU fault" in r.json()["message"]
        )
        backend.fail_when = lambda x: False
        r = await client.post(
            "/v1/inspect", content=make_image_bytes(16, 16, "png"), headers={"content-type": "image/png"}
        )
        assert r.status_code == 200
        assert 'aoi_requests_failed_total{reason="backend_error"} 1.0' in (await client.get("/metrics")).text


async def test_postprocess_failure_is_500_internal_error_not_a_backend_fault(
    bundle: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.inference.serving

    real = service.inference.serving.postprocess
    broken = {"on": True}

    def flaky_postprocess(*args: Any, **kw: Any) -> Any:
        if broken["on"]:
            raise IndexError("simulated post-processing bug")
        return real(*args, **kw)

    monkeypatch.setattr(service.inference.serving, "postprocess", flaky_postprocess)
    async with serve(Settings(max_delay_ms=0), bundle=bundle, backend=FakeBackend(bundle)) as client:  # type: ignore[arg-type]
        img = make_image_bytes(16, 16, "png")
        r = await client.post("/v1/inspect", content=img, headers={"content-type": "image/png"})
        assert r.status_code == 500 and r.json()["code"] == "internal_error"
        assert "post-processing failed" in r.json()["message"] and "IndexError" in r.json()["message"]
        broken["on"] = False
        r = await client.post("/v1/inspect", content=img, headers={"content-type": "image/png"})
        assert r.status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'aoi_requests_failed_total{reason="internal_error"} 1.0' in metrics
        assert 'aoi_requests_failed_total{reason="backend_error"} 0.0' in metrics


async def test_unexpected_error_is_a_json_500_with_the_request_id(
    bundle: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug below the routes still answers JSON with the request id, in the body and the X-Request-ID header."""
    from service.inference.pipeline import InspectionService

    async def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(InspectionService, "inspect", broken)
    async with serve(Settings(max_delay_ms=0), bundle=bundle, backend=FakeBackend(bundle)) as client:  # type: ignore[arg-type]
        r = await client.post(
            "/v1/inspect",
            content=make_image_bytes(16, 16, "png"),
            headers={"content-type": "image/png", "x-request-id": "req-42"},
        )
        assert r.status_code == 500 and r.headers["x-request-id"] == "req-42"
        assert r.json() == {
            "code": "internal_error",
            "message": "internal error; see the service log",
            "request_id": "req-42",
        }
        metrics = (await client.get("/metrics")).text
        assert 'aoi_requests_failed_total{reason="internal_error"} 1.0' in metrics
        assert 'aoi_request_duration_seconds_count{route="/v1/inspect",status="500"} 1.0' in metrics


async def test_model_info_shows_no_build_host_paths_and_metrics_is_documented_as_text(bundle: object) -> None:
    from service.core.bundle import ModelBundle

    assert isinstance(bundle, ModelBundle)
    old = bundle.model_copy(
        update={
            "provenance": {
                "source_checkpoint": "/home/ci/runs/x/best.pt",
                "train_summary": {"dataset": "/data/NEU-DET"},
                "tools": ["C:\\\\build\\\\onnx.exe", "plain"],
                "epochs": 80,
            }
        }
    )
    async with serve(Settings(max_delay_ms=0), bundle=old, backend=FakeBackend(old)) as client:
        info = (await client.get("/v1/model")).json()
        assert info["provenance"] == {"source_checkpoint": "best.pt", "train_summary": {"dataset": "NEU-DET"},
                                      "tools": ["onnx.exe", "plain"], "epochs": 80}  # fmt: skip
        spec = (await client.get("/openapi.json")).json()
        assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


async def test_opencv_threads_setting_is_applied_at_startup(bundle: Any) -> None:
    """opencv_threads: the service's decode and inference threads are its parallelism; OpenCV's own parallel loops
    are off by default (1) and back to OpenCV's default with 0."""
    import cv2

    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(-1)
        default = cv2.getNumThreads()
        for threads, expected in ((None, 1), (0, default), (3, 3)):
            settings = Settings() if threads is None else Settings(opencv_threads=threads)
            async with serve(settings, bundle=bundle, backend=FakeBackend(bundle)):  # type: ignore[arg-type]
                assert cv2.getNumThreads() == expected
    finally:
        cv2.setNumThreads(before)
