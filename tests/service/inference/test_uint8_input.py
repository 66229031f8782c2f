"""A bundle whose graph normalises its own uint8 NHWC input (``aoi export --from-bundle --uint8-input``) is served
with the same answers as the float bundle it came from: over HTTP on ONNX Runtime and OpenVINO (whole frames, tiles,
grey and colour), through the offline steps of ``aoi val`` / ``aoi predict``, and a model that disagrees with its
bundle.json about the input type is refused with a clear error."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.uint8_input import Uint8InputOptions, run_uint8_input
from service.backends.ort_backend import OrtBackend
from service.core.bundle import load_bundle, write_bundle
from service.core.errors import BackendUnavailable
from service.core.frames import TilingSettings, resolve_policy
from service.core.offline import FrameInspector
from service.settings import Settings
from tests.service.conftest import serve
from tests.synthetic import encode_image

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def u8_tiled(tiled_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("u8") / "bundle"
    run_uint8_input(Uint8InputOptions(tiled_bundle, out))
    return out


def _images() -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(5)
    out = []
    for i, (w, h) in enumerate([(128, 96), (50, 70), (300, 200), (64, 64)]):
        img = (rng.random((h, w, 3)) * 80).astype(np.uint8)
        img[h // 4 : h // 2, w // 4 : w // 2, i % 3] = 255  # a patch some class scores on
        if i == 1:
            img = np.repeat(img[:, :, :1], 3, axis=2)  # grey: decoded mono
        fmt = "jpeg" if i % 2 else "png"
        out.append((encode_image(img, fmt), f"image/{fmt}"))
    return out


async def _answers(bundle: Path, backend: str, tmp_path: Path) -> list[Any]:
    settings = Settings(bundle=bundle, backend=backend, max_delay_ms=0, openvino_cache=tmp_path / "ov")
    answers = []
    async with serve(settings) as client:
        for data, media in _images():
            for tiling in ("off", "on"):
                r = await client.post(f"/v1/inspect?tiling={tiling}", content=data, headers={"content-type": media})
                assert r.status_code == 200, r.text
                body = r.json()
                answers.append((body["verdict"], body["tiling"], body["detections"]))
    return answers


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "openvino"])
async def test_service_answers_as_the_float_bundle(
    tiled_bundle: Path, u8_tiled: Path, backend: str, tmp_path: Path
) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    float_answers = await _answers(tiled_bundle, backend, tmp_path)
    u8_answers = await _answers(u8_tiled, backend, tmp_path)
    assert any(dets for _, _, dets in float_answers)
    assert u8_answers == float_answers  # exact: the same boxes and scores to the last digit


def test_offline_steps_answer_as_the_float_bundle(tiled_bundle: Path, u8_tiled: Path) -> None:
    results = []
    for root in (tiled_bundle, u8_tiled):
        bundle = load_bundle(root)
        backend = OrtBackend(bundle, max_batch_size=4)
        policy = resolve_policy(bundle, TilingSettings())
        inspector = FrameInspector(bundle, backend, policy, np.full(bundle.nc, 0.001, np.float32), batch_size=4)
        frames = [(f"f{i}", data) for i, (data, _) in enumerate(_images())]
        results.append(
            [(f.key, f.detections.boxes_xyxy.tolist(), f.detections.scores.tolist()) for f in inspector.run(frames)]
        )
        backend.close()
    assert results[0] == results[1] and any(boxes for _, boxes, _ in results[0])


def test_model_and_bundle_json_must_agree_on_the_input(tiled_bundle: Path, u8_tiled: Path, tmp_path: Path) -> None:
    """A uint8 model under a bundle.json saying float32 NCHW (and the reverse) is refused, naming both."""
    cases = ((u8_tiled, tiled_bundle, "is uint8, bundle.json says float32 NCHW"),
             (tiled_bundle, u8_tiled, "is float32, bundle.json says uint8 NHWC"))  # fmt: skip
    for i, (model_from, meta_from, says) in enumerate(cases):
        root = tmp_path / f"mixed{i}"
        shutil.copytree(meta_from, root)
        shutil.copy(model_from / "model.onnx", root / "model.onnx")
        write_bundle(load_bundle(meta_from), root)  # hashes of what is there now
        with pytest.raises(BackendUnavailable, match=says):
            OrtBackend(load_bundle(root), max_batch_size=2)
        if importlib.util.find_spec("openvino") is not None:
            from service.backends.openvino_backend import OpenVinoBackend

            with pytest.raises(BackendUnavailable, match=says):
                OpenVinoBackend(load_bundle(root), precision="fp32", max_batch_size=2, cache_root=None)


async def test_live_swap_between_the_float_and_the_uint8_bundle(tiled_bundle: Path, u8_tiled: Path) -> None:
    """The swap's smoke check feeds the new bundle's input type; the batcher's buffers follow the served bundle."""
    from service.settings import SwapSettings

    root = u8_tiled.parent
    shutil.copytree(tiled_bundle, root / "float")
    settings = Settings(bundle=root / "float", backend="onnxruntime-cpu", max_delay_ms=0,
                        swap=SwapSettings(bundle_root=root), records={"enabled": False})  # type: ignore[arg-type]  # fmt: skip
    data, media = _images()[0]
    async with serve(settings) as client:
        answers = []
        for path in ("bundle", "float"):
            answers.append((await client.post("/v1/inspect", content=data, headers={"content-type": media})).json())
            r = await client.post("/v1/admin/bundle", json={"path": path})
            assert r.status_code == 200, r.text
        answers.append((await client.post("/v1/inspect", content=data, headers={"content-type": media})).json())
    assert [a["model_version"] for a in answers] == ["1.0.0", "1.0.0-u8", "1.0.0"]
    assert answers[0]["detections"] and answers[0]["detections"] == answers[1]["detections"] == answers[2]["detections"]
