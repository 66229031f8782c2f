"""Run a detector over a dataset split with the service's letterbox and post-processing, for evaluation.

``infer`` is any function from letterboxed images to the raw ``(B, 4+nc, A)`` output: a torch model here
(:func:`torch_infer`) or a served bundle's backend (``aoi val`` on a bundle), so both are scored identically.
Torch is imported only inside :func:`torch_infer`: evaluating a bundle needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from service.postprocess import Detections, postprocess
from service.preprocess import LetterboxInfo, letterbox
from train.dataset import DatasetSplit, read_image

if TYPE_CHECKING:
    import torch

__all__ = ["EVAL_CONF", "EVAL_IOU", "EVAL_MAX_DET", "InferFn", "predict_split", "torch_infer"]

EVAL_CONF, EVAL_IOU, EVAL_MAX_DET = 0.001, 0.7, 300  # the evaluation protocol's post-processing settings
InferFn = Callable[[Sequence[npt.NDArray[np.uint8]]], npt.NDArray[np.float32]]


def predict_split(
    infer: InferFn,
    split: DatasetSplit,
    *,
    input_hw: tuple[int, int],
    batch_size: int = 16,
    pad_value: int = 114,
    progress: Callable[[int, int], None] | None = None,
) -> list[Detections]:
    """Detections for every record of ``split`` (original-image pixels), in record order.

    Args:
        infer: letterboxed ``(H, W, 3)`` RGB uint8 images -> ``(B, 4+nc, A)`` float32 raw output.
        input_hw: network input (height, width).
        progress: called as ``progress(done, total)`` after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    nc = len(split.class_names)
    thresholds = np.full(nc, EVAL_CONF, dtype=np.float32)
    out: list[Detections] = []
    total = len(split.records)
    for start in range(0, total, batch_size):
        images: list[npt.NDArray[np.uint8]] = []
        infos: list[LetterboxInfo] = []
        for record in split.records[start : start + batch_size]:
            image, info = letterbox(read_image(record.path), input_hw, pad_value)
            images.append(image)
            infos.append(info)
        raw = np.asarray(infer(images), dtype=np.float32)
        if raw.ndim != 3 or raw.shape[0] != len(images) or raw.shape[1] != 4 + nc:
            raise ValueError(f"model output has shape {raw.shape}, expected ({len(images)}, {4 + nc}, anchors)")
        out += postprocess(raw, infos, thresholds, nms_iou=EVAL_IOU, max_detections=EVAL_MAX_DET)
        if progress is not None:
            progress(len(out), total)
    return out


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
