"""The variant table: every model name the CLI, the checkpoints and the bundles know, and the one function that builds
a variant from its name (``create_model``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.dysample import dysample_n, dysample_s
from models.gms2 import gms2_n, gms2_s
from models.grace import grace_n, grace_s
from models.yolo11 import Detector, yolo11l, yolo11m, yolo11n, yolo11s, yolo11x
from models.yolov8 import yolov8l, yolov8m, yolov8n, yolov8s, yolov8x

__all__ = ["VARIANTS", "count_parameters", "create_model"]

VARIANTS: dict[str, Callable[..., Detector]] = {
    "yolo11n": yolo11n,
    "yolo11s": yolo11s,
    "yolo11m": yolo11m,
    "yolo11l": yolo11l,
    "yolo11x": yolo11x,
    "yolov8n": yolov8n,
    "yolov8s": yolov8s,
    "yolov8m": yolov8m,
    "yolov8l": yolov8l,
    "yolov8x": yolov8x,
    "grace-n": grace_n,
    "grace-s": grace_s,
    "dysample-n": dysample_n,
    "dysample-s": dysample_s,
    "gms2-n": gms2_n,
    "gms2-s": gms2_s,
}


def create_model(name: str, nc: int = 6, **kw: Any) -> Detector:
    """Build variant ``name`` with ``nc`` classes; ``kw`` goes to its builder (e.g. ``dyscope=True`` for DySample).

    Raises:
        KeyError: unknown ``name`` (the message lists the known ones).
        ValueError: ``nc < 1``.
    """
    if name not in VARIANTS:
        raise KeyError(f"unknown model variant {name!r}; choose one of {', '.join(VARIANTS)}")
    if nc < 1:
        raise ValueError(f"nc must be >= 1, got {nc}")
    model = VARIANTS[name](nc=nc, **kw)
    model.model_kwargs = dict(kw)
    return model


def count_parameters(model: Detector) -> int:
    """All parameters, frozen ones (the DFL's 16 bin weights) included, as the published totals count them."""
    return sum(p.numel() for p in model.parameters())
