"""Checkpoint format: a plain dict of tensors and builtins, loadable with ``torch.load(weights_only=True)``.

No pickled classes: the model is rebuilt from ``variant`` + ``nc`` + ``model_kwargs`` and the state_dict is loaded
into it, so a checkpoint never executes code and survives refactors that keep the state_dict keys. Ultralytics
``best.pt`` files (pickled module objects) are read by the restricted unpickler and converted to the same structure
(``read_checkpoint``), so export and fine-tuning take either.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from models.fuse import fuse_model
from models.safe_unpickle import UnpickleRefused, load_torch_archive
from models.ultralytics_ckpt import UltralyticsError, convert_ultralytics
from models.yolo11 import Detector

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "aoi-checkpoint"
CHECKPOINT_VERSION = 1
_RESERVED = ("format", "format_version", "variant", "nc", "class_names", "imgsz", "model_kwargs", "state_dict", "fused")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def save_checkpoint(
    path: str | Path,
    model: Detector,
    *,
    class_names: list[str] | tuple[str, ...],
    imgsz: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` and its metadata to ``path`` (parent directories are created).

    Args:
        path: output file (``.pt`` by convention).
        model: the detector; a fused model is saved as fused and re-fused on load.
        class_names: one name per class, ``len == model.nc``.
        imgsz: square training/inference input side in pixels.
        extra: more top-level keys (``train_summary``, ``optimizer``, ``ema``, ``epoch``, ...); tensors, numbers,
            strings, lists and dicts only, so the file stays loadable with ``weights_only=True``.
    """
    names = [str(n) for n in class_names]
    if len(names) != model.nc:
        raise ValueError(f"{path}: {len(names)} class names for a model with nc={model.nc}")
    clash = sorted(set(extra or {}) & set(_RESERVED))
    if clash:
        raise ValueError(f"{path}: extra keys {clash} would overwrite checkpoint fields")
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "variant": model.variant,
        "nc": model.nc,
        "class_names": names,
        "imgsz": int(imgsz),
        "model_kwargs": dict(model.model_kwargs),
        "fused": bool(model.fused),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "train_summary": {},
    }
    ckpt.update(extra or {})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)


def _read_foreign(path: Path) -> dict[str, Any]:
    """A file ``weights_only`` refused: read it with the restricted unpickler and convert an Ultralytics checkpoint."""
    try:
        raw = load_torch_archive(path)
    except UnpickleRefused as exc:
        raise CheckpointError(path, f"not loaded, nothing in it was run: {exc}") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, f"not a loadable checkpoint ({type(exc).__name__}: {exc})") from None
    try:
        return convert_ultralytics(raw, path)
    except UltralyticsError as exc:
        raise CheckpointError(path, str(exc)) from None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict at ``path`` (ours, or an Ultralytics ``.pt`` converted to our fields), model not built.

    Raises:
        CheckpointError: missing/unreadable file, a refused pickle global, an unsupported Ultralytics model, not an
            aoi checkpoint, or a wrong format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # pickled objects (an Ultralytics checkpoint, or worse): never torch.load them
        ckpt = _read_foreign(path)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(path, f"not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"not an {CHECKPOINT_FORMAT} file (missing 'format': '{CHECKPOINT_FORMAT}') "
                              "nor an Ultralytics checkpoint")  # fmt: skip
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(path, f"format_version {ckpt.get('format_version')!r}, expected {CHECKPOINT_VERSION}")
    missing = [k for k in ("variant", "nc", "class_names", "imgsz", "state_dict") if k not in ckpt]
    if missing:
        raise CheckpointError(path, f"missing fields {missing}")
    return ckpt


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Detector, dict[str, Any]]:
    """Rebuild the detector stored at ``path`` and return it (eval mode) with the whole checkpoint dict.

    ``path`` is one of our checkpoints or an Ultralytics YOLO11/YOLOv8 detection ``.pt`` (see ``read_checkpoint``).

    Raises:
        CheckpointError: as ``read_checkpoint``, plus an unknown variant or a state_dict mismatch.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, map_location)
    from models.variants import create_model

    try:
        model = create_model(ckpt["variant"], nc=int(ckpt["nc"]), **dict(ckpt.get("model_kwargs") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot rebuild the model: {exc}") from exc
    if ckpt.get("fused", False):
        fuse_model(model)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"state_dict does not match variant {ckpt['variant']!r}: {exc}") from exc
    model.to(map_location).eval()
    return model, ckpt
