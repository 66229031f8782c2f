"""Ultralytics 8.x detection checkpoints (``best.pt`` / ``last.pt``) -> our checkpoint structure, without ultralytics.

The file is read by :mod:`models.safe_unpickle` (nothing in it runs); from the inert records we take ``names``, the
model ``yaml`` (family, scale, nc), the training ``imgsz`` and the weights (FP16 -> float32), whose keys already follow
our layout (``model.23.cv3.1.0.0.conv.weight``). Only plain YOLO11 and YOLOv8 detection models are accepted; other
tasks and families are refused with what is supported. See docs/byom.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from models.safe_unpickle import Record

__all__ = ["SUPPORTED", "ULTRALYTICS_FORMAT", "UltralyticsError", "convert_ultralytics"]

ULTRALYTICS_FORMAT = "ultralytics"
SUPPORTED = "Ultralytics YOLO11 and YOLOv8 detection models (scales n, s, m, l, x)"

# Ultralytics model classes of other tasks/families, and what they are, for the refusal message.
_OTHER_TASKS = {
    "SegmentationModel": "a segmentation model",
    "PoseModel": "a pose model",
    "OBBModel": "an oriented-box (OBB) model",
    "ClassificationModel": "a classification model",
    "RTDETRDetectionModel": "an RT-DETR model",
    "WorldModel": "a YOLO-World model",
    "YOLOEModel": "a YOLOE model",
    "YOLOESegModel": "a YOLOE segmentation model",
}
# Layer class names that tell the family apart when the yaml does not.
_FAMILY_BLOCKS = {"C3k2": "yolo11", "C2f": "yolov8"}


class UltralyticsError(ValueError):
    """A readable Ultralytics file that cannot be imported; ``str()`` is the problem (the caller adds the path)."""


def _qualname(obj: Any) -> str:
    return obj.qualname if isinstance(obj, Record) else type(obj).__name__


def _short(obj: Any) -> str:
    return _qualname(obj).rsplit(".", 1)[-1]


def _state_dict(module: Record, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers of a module record tree, keyed like ``nn.Module.state_dict``."""
    state = module.__dict__
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            yield prefix + name, value
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            yield prefix + name, value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Record):
            yield from _state_dict(child, f"{prefix}{name}.")


def _layers(model: Record) -> list[Record]:
    seq = (model.__dict__.get("_modules") or {}).get("model")
    layers = list(((seq.__dict__.get("_modules") or {}) if isinstance(seq, Record) else {}).values())
    if not layers or not all(isinstance(layer, Record) for layer in layers):
        raise UltralyticsError(f"no layer list in the model record ({_qualname(model)}); expected {SUPPORTED}")
    return layers


def _attr(obj: Any, key: str) -> Any:
    """``obj[key]`` for dicts, ``obj.key`` for records (Ultralytics keeps ``args`` as either)."""
    if isinstance(obj, dict):
        return obj.get(key)
    return obj.__dict__.get(key) if isinstance(obj, Record) else None


def _check_task(model: Record, layers: list[Record]) -> None:
    kind = _short(model)
    if kind in _OTHER_TASKS:
        raise UltralyticsError(f"{_OTHER_TASKS[kind]} ({kind}); only {SUPPORTED} can be imported")
    if kind != "DetectionModel":
        raise UltralyticsError(f"model class {_qualname(model)} is not a detection model; only {SUPPORTED}")
    head = _short(layers[-1])
    if head != "Detect":
        raise UltralyticsError(f"the last layer is {head}, not Detect (another task or head); only {SUPPORTED}")
    if (_attr(layers[-1], "end2end") or False) is True:
        raise UltralyticsError(f"an end-to-end (NMS-free one-to-one) head; only {SUPPORTED}")


def _family(yaml: dict[str, Any], layers: list[Record]) -> str:
    kinds = {_short(layer) for layer in layers}
    found = {family for block, family in _FAMILY_BLOCKS.items() if block in kinds}
    source = str(yaml.get("yaml_file") or "")
    if len(found) != 1:
        blocks = ", ".join(sorted(kinds))
        raise UltralyticsError(f"model {source or '(no yaml_file)'} with layers {blocks} is neither YOLO11 nor YOLOv8; "
                               f"only {SUPPORTED}")  # fmt: skip
    return found.pop()


def _class_names(model: Record, nc: int) -> list[str]:
    names = _attr(model, "names")
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list | tuple) or len(names) != nc:
        raise UltralyticsError(f"model.names {names!r:.120} is not {nc} class names (nc={nc} in the yaml)")
    return [str(n) for n in names]


def _imgsz(ckpt: dict[str, Any], model: Record) -> int:
    for args in (ckpt.get("train_args"), _attr(model, "args")):
        size = _attr(args, "imgsz")
        if isinstance(size, list | tuple) and size and len(set(size)) == 1:
            size = size[0]
        if isinstance(size, int) and size > 0:
            return size
    return 640  # Ultralytics' default training size


def convert_ultralytics(raw: Any, path: Path) -> dict[str, Any]:
    """An unpickled Ultralytics checkpoint (records) -> our checkpoint dict (``models.checkpoint`` fields).

    Returns:
        ``{"format": "aoi-checkpoint", "variant", "nc", "class_names", "imgsz", "model_kwargs", "fused",
        "state_dict" (float32), "train_summary", "imported_from"}``; the variant's scale is ``yaml["scale"]`` or,
        when the yaml has none, found by matching the tensor shapes against every scale of the family.

    Raises:
        UltralyticsError: not a checkpoint dict, another task or family, or inconsistent metadata.
    """
    if not isinstance(raw, dict):
        raise UltralyticsError(f"top level is a {_qualname(raw)}, not an Ultralytics checkpoint dict")
    model = raw.get("ema") or raw.get("model")
    if not isinstance(model, Record):
        raise UltralyticsError("no 'model' or 'ema' entry holding a pickled Ultralytics model")
    layers = _layers(model)
    _check_task(model, layers)
    yaml = _attr(model, "yaml")
    if not isinstance(yaml, dict):
        raise UltralyticsError("the model record has no yaml dict (family, scale, nc)")
    family = _family(yaml, layers)
    nc = int(_attr(layers[-1], "nc") or yaml.get("nc") or 0)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in _state_dict(model)}
    fused = not any(".bn." in k for k in state_dict)
    scale = str(yaml.get("scale") or "")
    variant = f"{family}{scale}" if scale else _match_scale(family, nc, state_dict, fused)
    return {
        "format": "aoi-checkpoint",
        "format_version": 1,
        "variant": variant,
        "nc": nc,
        "class_names": _class_names(model, nc),
        "imgsz": _imgsz(raw, model),
        "model_kwargs": {},
        "fused": fused,
        "state_dict": state_dict,
        "train_summary": {"dataset": str(_attr(raw.get("train_args"), "data") or "")} if raw.get("train_args") else {},
        "imported_from": {
            "format": ULTRALYTICS_FORMAT,
            "file": path.name,
            "ultralytics_version": str(raw.get("version") or ""),
            "yaml_file": Path(str(yaml.get("yaml_file") or "")).name,  # a name, never the training host's path
            "epoch": raw.get("epoch"),
            "date": str(raw.get("date") or ""),
        },
    }


def _match_scale(family: str, nc: int, state_dict: dict[str, torch.Tensor], fused: bool) -> str:
    """The ``family`` variant whose state_dict has exactly these keys and shapes (a yaml without ``scale``)."""
    from models.fuse import fuse_model
    from models.variants import create_model

    for scale in "nsmlx":
        candidate = create_model(f"{family}{scale}", nc=nc)
        own = (fuse_model(candidate) if fused else candidate).state_dict()
        if own.keys() == state_dict.keys() and all(own[k].shape == v.shape for k, v in state_dict.items()):
            return f"{family}{scale}"
    raise UltralyticsError(f"the weights match no {family} scale (n, s, m, l, x): a modified architecture? "
                           f"only {SUPPORTED}")  # fmt: skip
