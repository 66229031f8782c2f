"""The model's native scale, recorded in the bundle so the service can tile large frames at it.

A detector learns defects at the pixel scale of its training images: the trainer letterboxes each image into
``imgsz``, so a 200 px NEU-DET image at imgsz 256 is seen at 1.28 input pixels per image pixel. Served at that scale,
one model input covers ``input side / 1.28 = 200`` frame pixels: the native tile. Where the scale comes from, best
first: ``--native-tile`` (a camera whose optics differ), ``--native-scale``, the training images' median long side
(written into the checkpoint by ``aoi train``), the calibration split's images; otherwise the bundle has no native
scale and the service letterboxes frames whole, as before.
"""

from __future__ import annotations

from typing import Any

from service.core.bundle import TilingSpec
from train.dataset import DatasetSplit, image_size_stats

__all__ = ["native_tiling"]


def native_tiling(
    *,
    input_width: int,
    input_height: int,
    train_imgsz: int,
    ckpt: dict[str, Any],
    calibration: DatasetSplit | None,
    native_tile: int | None = None,
    native_scale: float | None = None,
    mode: str = "auto",
    overlap: float = 0.25,
    full_frame: bool = False,
) -> tuple[TilingSpec | None, str]:
    """The bundle's ``tiling`` section and a line saying where it came from (None: no native scale known).

    Args:
        input_width, input_height: the exported model input.
        train_imgsz: the side the checkpoint was trained at.
        native_tile: frame pixels across one model input (overrides everything).
        native_scale: model-input pixels per frame pixel (overrides the data).
    """
    if native_tile is not None:
        tile_w, source = float(native_tile), f"--native-tile {native_tile}"
    elif native_scale is not None:
        tile_w, source = input_width / native_scale, f"--native-scale {native_scale:g}"
    else:
        stats = ((ckpt.get("train_summary") or {}).get("image_size")) or {}
        where = "training images"
        if not stats and calibration is not None:
            stats, where = image_size_stats(calibration), f"{calibration.split} images of the calibration data"
        long_side = stats.get("median_long_side")
        if not long_side:
            return None, "no native scale: the checkpoint has no training image sizes and no calibration data was given"
        scale = train_imgsz / float(long_side)  # the trainer letterboxes the long side into imgsz
        tile_w = input_width / scale
        source = (f"median long side of the {where}: {long_side:g} px at training imgsz {train_imgsz} "
                  f"({scale:.4g} input px per frame px)")  # fmt: skip
    tile_h = tile_w * input_height / input_width
    spec = TilingSpec(
        mode=mode,  # type: ignore[arg-type]
        tile_width=max(1, round(tile_w)),
        tile_height=max(1, round(tile_h)),
        overlap=overlap,
        full_frame=full_frame,
        source=source,
    )
    return spec, source
