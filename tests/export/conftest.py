"""Export fixtures: a tiny untrained checkpoint and a small synthetic VOC calibration set (no /work/shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

CLASSES = ("disc", "rect", "triangle")  # the order the VOC reader gives (sorted): export checks it
IMGSZ = 64  # smallest size every variant accepts (multiple of the 32 stride): keeps each export to seconds


def make_checkpoint(path: Path, variant: str = "yolo11n", imgsz: int = IMGSZ, seed: int = 0) -> Path:
    import torch

    from models import create_model, save_checkpoint

    torch.manual_seed(seed)
    model = create_model(variant, nc=len(CLASSES))
    summary = {"epochs": 0, "metrics": {"map50": 0.0}, "note": "untrained test weights"}
    save_checkpoint(path, model, class_names=list(CLASSES), imgsz=imgsz, extra={"train_summary": summary})
    return path


@pytest.fixture(scope="session")
def yolo11n_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "yolo11n.pt")


@pytest.fixture(scope="session")
def voc_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.train.conftest import make_voc_dataset

    return make_voc_dataset(tmp_path_factory.mktemp("voc"), 2, 6, size=80, classes=CLASSES)
