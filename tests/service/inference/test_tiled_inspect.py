"""The whole HTTP path on large synthetic frames: tiles at the bundle's native scale, merged, limits before decode."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from service.core.bundle import load_bundle
from service.core.frames import TilingSettings, plan_frame, resolve_policy
from service.settings import Settings
from tests.service.conftest import serve
from tests.synthetic import encode_image

pytestmark = pytest.mark.anyio

# The synthetic model scores 8 px cells by their mean red (class 0) and gives each a 16 px box (tests/synthetic.py).
# Its bundle gets a native tile of 64 frame px (= its input: scale 1), overlap 0.25 -> tiles every 48 px.
PATCH = (56, 40, 72, 56)  # x1, y1, x2, y2: four cells, across the tile borders at x 48/64 and y 48


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _frame(width: int = 640, height: int = 480, gray: bool = False) -> bytes:
    img = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = PATCH
    img[y1:y2, x1:x2, 0] = 255
    return encode_image(img[:, :, 0] if gray else img, "png")


def _settings(root: Path, **kw: object) -> Settings:
    return Settings(bundle=root, backend="onnxruntime-cpu", max_delay_ms=0, **kw)  # type: ignore[arg-type]


def _cell_boxes() -> set[tuple[float, ...]]:
    """What a perfect tiled inspection returns: one 16 px box per cell fully inside the patch, once each."""
    x1, y1, x2, y2 = PATCH
    return {(cx - 8.0, cy - 8.0, cx + 8.0, cy + 8.0) for cx in range(x1 + 4, x2, 8) for cy in range(y1 + 4, y2, 8)}


async def test_small_defect_at_a_tile_corner_is_found_once(tiled_bundle: Path) -> None:
    policy = resolve_policy(load_bundle(tiled_bundle), TilingSettings())
    expected_tiles = plan_frame(640, 480, policy).inputs
    async with serve(_settings(tiled_bundle)) as client:
        r = await client.post("/v1/inspect", content=_frame(), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tiling"]["tiled"] is True and body["tiling"]["tiles"] == expected_tiles == 13 * 10
        assert body["verdict"] == "NG" and (body["width"], body["height"]) == (640, 480)
        boxes = [tuple(d["box_xyxy"]) for d in body["detections"]]
        assert len(boxes) == len(set(boxes)) == 4, boxes  # seen by up to four tiles each, returned once
        assert set(boxes) == _cell_boxes()
        assert {d["class_name"] for d in body["detections"]} == {"scratch"}
        assert body["timings_ms"]["merge"] >= 0.0

        # The same frame letterboxed whole (the service before tiling): 640 px into 64, the patch is 1.6 px wide.
        r = await client.post("/v1/inspect?tiling=off", content=_frame(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["verdict"] == "OK" and r.json()["tiling"]["tiles"] == 1

        metrics = (await client.get("/metrics")).text
        assert re.search(r"^aoi_tiles_per_frame_count 2\.0$", metrics, re.M)
        assert re.search(rf"^aoi_model_inputs_processed_total {expected_tiles + 1}\.0$", metrics, re.M)
        assert re.search(r'^aoi_tiled_frame_stage_seconds_count\{stage="total"\} 1\.0$', metrics, re.M)
        info = (await client.get("/v1/model")).json()["tiling"]
        assert (info["mode"], info["tile_width"], info["overlap"], info["max_tiles_per_frame"]) == (
            "auto",
            64,
            0.25,
            1024,
        )


async def test_mono_frame_and_multipart_share_batches(tiled_bundle: Path) -> None:
    small = encode_image(np.zeros((64, 64, 3), np.uint8), "png")
    files = [("images", ("big.png", _frame(gray=True), "image/png")), ("images", ("small.png", small, "image/png"))]
    async with serve(_settings(tiled_bundle)) as client:
        r = await client.post("/v1/inspect", files=files)
        assert r.status_code == 200, r.text
        big, tiny = r.json()["results"]
        assert big["tiling"]["tiles"] == 130 and tiny["tiling"] == {"tiled": False, "tiles": 1, "batches": 1}
        # mono: the grey patch is 255 in every channel, so both classes (red and green cells) fire on it
        assert big["verdict"] == "NG" and tiny["verdict"] == "OK"
        assert {tuple(d["box_xyxy"]) for d in big["detections"]} == _cell_boxes()


def _png_header_then_garbage(width: int, height: int) -> bytes:
    import struct

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0" + b"garbage" * 50


async def test_tile_limits_are_refused_before_decoding(tiled_bundle: Path) -> None:
    settings = _settings(tiled_bundle, tiling=TilingSettings(max_tiles_per_frame=100, max_tiles_per_request=150))
    async with serve(settings) as client:
        # 130 tiles > 100: refused from the header, although the pixel data behind it is not a PNG at all
        r = await client.post("/v1/inspect", content=_png_header_then_garbage(640, 480),
                              headers={"content-type": "image/png", "x-request-id": "t1"})  # fmt: skip
        assert r.status_code == 413, r.text
        body = r.json()
        assert body["code"] == "too_many_tiles" and body["request_id"] == "t1"
        assert "130 tiles" in body["message"] and "tiling.max_tiles_per_frame" in body["message"]
        # two frames of 88 tiles each: each under the frame limit, together over the request limit
        frame = _png_header_then_garbage(480, 400)
        files = [("images", (f"{i}.png", frame, "image/png")) for i in range(2)]
        r = await client.post("/v1/inspect", files=files)
        assert r.status_code == 413 and "tiling.max_tiles_per_request" in r.json()["message"], r.text
        # untiled, the same header is one input and only then fails to decode: 422, not 413
        r = await client.post("/v1/inspect?tiling=off", content=_png_header_then_garbage(640, 480),
                              headers={"content-type": "image/png"})  # fmt: skip
        assert r.status_code == 422, r.text
        r = await client.post("/v1/inspect?tiling=sideways", content=_frame(), headers={"content-type": "image/png"})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request"
        metrics = (await client.get("/metrics")).text
        assert re.search(r'^aoi_requests_rejected_total\{reason="too_many_tiles"\} 2\.0$', metrics, re.M)


async def test_bundle_without_native_scale_is_served_as_before(bundle_dir: Path) -> None:
    async with serve(_settings(bundle_dir)) as client:
        r = await client.post("/v1/inspect", content=_frame(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["tiling"]["tiles"] == 1
        r = await client.post("/v1/inspect?tiling=on", content=_frame(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["tiling"]["tiled"] is True  # on: tiles of the model input size
        assert r.json()["verdict"] == "NG"


async def test_offline_inspection_answers_what_the_service_answers(tiled_bundle: Path) -> None:
    """aoi val / aoi predict (service.core.offline) and the HTTP service run the same steps: same boxes, scores,
    classes."""
    from service.backends import load_backend
    from service.core.offline import FrameInspector

    bundle = load_bundle(tiled_bundle)
    data = _frame(width=333, height=217)  # odd sizes: uneven tile spacing, edge windows
    async with serve(_settings(tiled_bundle)) as client:
        served = (await client.post("/v1/inspect", content=data, headers={"content-type": "image/png"})).json()
    backend = load_backend("onnxruntime-cpu", bundle, max_batch_size=8).backend
    policy = resolve_policy(bundle, TilingSettings())
    thresholds = np.asarray(bundle.thresholds(), np.float32)
    (offline,) = list(FrameInspector(bundle, backend, policy, thresholds, batch_size=3).run([("f", data)]))
    backend.close()
    assert offline.tiles == served["tiling"]["tiles"] and offline.tiled
    got = sorted(zip(offline.detections.boxes_xyxy.tolist(), offline.detections.class_ids.tolist(), strict=True))
    want = sorted((d["box_xyxy"], d["class_id"]) for d in served["detections"])
    assert got == want and got  # tiles off the 8 px cell grid here: pieces join into fewer, wider boxes


async def test_very_elongated_images_are_tiled_or_refused_never_a_500(tiled_bundle: Path, bundle_dir: Path) -> None:
    strip = encode_image(np.zeros((4000, 1, 3), np.uint8), "png")  # 1 x 4000: letterboxed whole, 0 px wide
    async with serve(_settings(tiled_bundle)) as client:
        png = {"content-type": "image/png"}
        r = await client.post("/v1/inspect", content=strip, headers=png)  # tiles of 1 x 64: 1.6 % of a tile each
        assert r.status_code == 422 and r.json()["code"] == "image_too_thin", r.text
        assert "tiling.min_tile_fill" in r.json()["message"]
        narrow = encode_image(np.zeros((4000, 16, 3), np.uint8), "png")  # 16 x 4000: a quarter of each tile
        r = await client.post("/v1/inspect", content=narrow, headers=png)
        assert r.status_code == 200 and r.json()["tiling"]["tiled"], r.text
        tiny = encode_image(np.zeros((2, 2, 3), np.uint8), "png")  # one input, however small: never "too thin"
        r = await client.post("/v1/inspect?tiling=on", content=tiny, headers=png)
        assert r.status_code == 200 and r.json()["tiling"]["tiles"] == 1, r.text
    async with serve(_settings(bundle_dir)) as client:  # no native scale: the whole strip into 64 x 64
        r = await client.post("/v1/inspect", content=strip, headers={"content-type": "image/png", "x-request-id": "s"})
        assert r.status_code == 422 and r.json()["code"] == "zero_size_image" and r.json()["request_id"] == "s"
