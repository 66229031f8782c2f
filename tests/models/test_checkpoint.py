"""Checkpoint round-trip (weights_only), metadata, fused checkpoints and clear errors for bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import models
from models import CheckpointError, load_checkpoint, save_checkpoint

NAMES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


@pytest.mark.parametrize("name", ["yolo11n", "grace-n", "gms2-n"])
def test_round_trip(name: str, built, tmp_path: Path) -> None:
    model = built(name)
    model.set_epoch(12)
    path = tmp_path / "run" / "best.pt"
    save_checkpoint(path, model, class_names=NAMES, imgsz=640, extra={"train_summary": {"map50": 0.7}, "epoch": 12})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "aoi-checkpoint" and raw["format_version"] == 1
    assert (raw["variant"], raw["nc"], raw["class_names"], raw["imgsz"]) == (name, 6, NAMES, 640)
    assert raw["train_summary"] == {"map50": 0.7} and raw["epoch"] == 12

    loaded, ckpt = load_checkpoint(path)
    assert not loaded.training and loaded.variant == name and ckpt["class_names"] == NAMES
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded(x)), model.eval().decode(model(x)))


def test_model_kwargs_and_fused_round_trip(tmp_path: Path) -> None:
    model = models.fuse_model(models.create_model("dysample-n", nc=2, dyscope=True))
    save_checkpoint(tmp_path / "m.pt", model, class_names=["a", "b"], imgsz=320)
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["model_kwargs"] == {"dyscope": True} and ckpt["fused"] is True
    assert loaded.fused and loaded.model[11].scope is not None
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_save_validates_inputs(built, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class names"):
        save_checkpoint(tmp_path / "m.pt", built("yolo11n"), class_names=["a"], imgsz=640)
    with pytest.raises(ValueError, match="overwrite"):
        save_checkpoint(tmp_path / "m.pt", built("yolo11n"), class_names=NAMES, imgsz=640, extra={"nc": 3})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the deliberately foreign pickle below
def test_load_errors_name_the_file(built, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        load_checkpoint(garbage)

    other = tmp_path / "other.pt"
    torch.save({"model": 1}, other)
    with pytest.raises(CheckpointError, match="aoi-checkpoint"):
        load_checkpoint(other)

    pickled = tmp_path / "pickled.pt"
    with pickled.open("wb") as f:
        pickle.dump({"format": "aoi-checkpoint", "obj": Path("x")}, f)
    with pytest.raises(CheckpointError, match=r"pickled\.pt"):
        load_checkpoint(pickled)

    good = tmp_path / "good.pt"
    save_checkpoint(good, built("yolo11n"), class_names=NAMES, imgsz=640)
    ckpt = torch.load(good, weights_only=True)
    ckpt["variant"] = "yolo99"
    torch.save(ckpt, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="yolo99"):
        load_checkpoint(tmp_path / "unknown.pt")
    ckpt["variant"] = "yolo11s"
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="state_dict"):
        load_checkpoint(tmp_path / "mismatch.pt")
