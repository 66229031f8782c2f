"""The evaluation loop: a detector over images with the service's letterbox and post-processing, for ``aoi val``,
export parity and threshold calibration, and the protocol constants they share.

``infer`` is any function from letterboxed images to the raw ``(B, 4+nc, A)`` output: a torch model here
(:func:`torch_infer`) or an exported runtime (``export.runtimes``: ONNX Runtime, TensorRT), so all are scored
identically. Torch is imported only inside :func:`torch_infer`. (``aoi val`` on a bundle runs the served path instead,
``service.core.offline``, with these constants.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from service.core.postprocess import Detections, postprocess
from service.core.preprocess import LetterboxInfo, letterbox
from train.dataset import DatasetSplit, read_image

if TYPE_CHECKING:
    import torch

__all__ = [
    "EVAL_CONF",
    "EVAL_IOU",
    "EVAL_MAX_DET",
    "InferFn",
    "Predictions",
    "predict_images",
    "predict_split",
    "torch_infer",
]

# The evaluation protocol's post-processing settings, shared by val, export parity and calibration.
EVAL_CONF, EVAL_IOU, EVAL_MAX_DET = 0.001, 0.7, 300
InferFn = Callable[[Sequence[npt.NDArray[np.uint8]]], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class Predictions:
    """What :func:`predict_images` saw and made, in image order."""

    detections: list[Detections]  # original-image pixels, at the evaluation protocol's settings
    infos: list[LetterboxInfo]
    raw: npt.NDArray[np.float32] | None  # (N, 4+nc, A) network outputs; None unless asked for (it is large)


def predict_images(
    infer: InferFn,
    image: Callable[[int], npt.NDArray[np.uint8]],
    count: int,
    nc: int,
    *,
    input_hw: tuple[int, int],
    batch_size: int = 16,
    pad_value: int = 114,
    progress: Callable[[int, int], None] | None = None,
    keep_raw: bool = False,
) -> Predictions:
    """The evaluation loop: letterbox -> ``infer`` in batches -> the service's post-processing at
    :data:`EVAL_CONF` / :data:`EVAL_IOU` / :data:`EVAL_MAX_DET`.

    Args:
        infer: letterboxed ``(H, W, 3)`` RGB uint8 images -> ``(B, 4+nc, A)`` float32 raw output.
        image: index ``0..count-1`` -> that image, RGB uint8 HWC (read only when its batch runs).
        input_hw: network input (height, width).
        progress: called as ``progress(done, total)`` after each batch.
        keep_raw: also return every raw output (export parity compares them).

    Raises:
        ValueError: ``batch_size`` < 1, or ``infer`` returned an output of the wrong shape.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    thresholds = np.full(nc, EVAL_CONF, dtype=np.float32)
    dets: list[Detections] = []
    infos: list[LetterboxInfo] = []
    raws: list[npt.NDArray[np.float32]] = []
    for start in range(0, count, batch_size):
        images: list[npt.NDArray[np.uint8]] = []
        batch_infos: list[LetterboxInfo] = []
        for i in range(start, min(start + batch_size, count)):
            boxed, info = letterbox(image(i), input_hw, pad_value)
            images.append(boxed)
            batch_infos.append(info)
        raw = np.asarray(infer(images), dtype=np.float32)
        if raw.ndim != 3 or raw.shape[0] != len(images) or raw.shape[1] != 4 + nc:
            raise ValueError(f"model output has shape {raw.shape}, expected ({len(images)}, {4 + nc}, anchors)")
        if keep_raw:
            raws.append(raw)
        infos += batch_infos
        dets += postprocess(raw, batch_infos, thresholds, nms_iou=EVAL_IOU, max_detections=EVAL_MAX_DET)
        if progress is not None:
            progress(len(dets), count)
    return Predictions(dets, infos, np.concatenate(raws, axis=0) if raws else None)


def predict_split(
    infer: InferFn,
    split: DatasetSplit,
    *,
    input_hw: tuple[int, int],
    batch_size: int = 16,
    pad_value: int = 114,
    progress: Callable[[int, int], None] | None = None,
) -> list[Detections]:
    """Detections for every record of ``split`` (original-image pixels), in record order (:func:`predict_images`)."""
    records = split.records
    return predict_images(
        infer,
        lambda i: read_image(records[i].path),
        len(records),
        len(split.class_names),
        input_hw=input_hw,
        batch_size=batch_size,
        pad_value=pad_value,
        progress=progress,
    ).detections


def torch_infer(model: torch.nn.Module, device: str | torch.device = "cpu") -> InferFn:
    """Wrap a :class:`models.Detector` (raw maps + ``decode``) or an ``InferenceModel`` (decoded output) as an
    :data:`InferFn`: uint8 images / 255 -> float32 NCHW on ``device``, no grad, output back as numpy."""
    import torch

    dev = torch.device(device)
    decode: Any = getattr(model, "decode", None)

    def infer(images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))).to(dev)
        with torch.inference_mode():
            x = batch.float() / 255.0
            raw = model(x)
            output = decode(raw) if decode is not None else raw
        return np.asarray(output.float().cpu().numpy(), dtype=np.float32)

    return infer
