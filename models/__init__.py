"""Pure-PyTorch model zoo: YOLO11 and YOLOv8 n/s/m/l/x and the GRACE, GMS2-YOLO and YOLO11-DySample variants.

``create_model(name, nc=6, **kw)`` builds any variant from the plain ``VARIANTS`` table; see docs/models.md.
"""

from __future__ import annotations

from models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from models.dysample import DySample
from models.fuse import fuse_model
from models.grace import LiteFEN, lite_fen_strength
from models.head import dist2bbox, make_anchors
from models.variants import VARIANTS, count_parameters, create_model
from models.yolo11 import Detector, InferenceModel

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "Detector",
    "DySample",
    "InferenceModel",
    "LiteFEN",
    "count_parameters",
    "create_model",
    "dist2bbox",
    "fuse_model",
    "lite_fen_strength",
    "load_checkpoint",
    "make_anchors",
    "read_checkpoint",
    "save_checkpoint",
]
