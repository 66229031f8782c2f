"""`aoi train`: train a detector on a VOC (NEU-DET style) or YOLO (data.yaml) dataset. See docs/training.md."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

# Flag -> TrainConfig field, for flags whose value is copied as-is when given.
_FLAGS: dict[str, str] = {
    "model": "model",
    "data": "data",
    "epochs": "epochs",
    "imgsz": "imgsz",
    "batch": "batch",
    "device": "device",
    "workers": "workers",
    "out": "out",
    "weights": "weights",
    "seed": "seed",
    "sampler": "sampler",
    "box_loss": "box_loss",
    "optimizer": "optimizer",
    "lr0": "lr0",
    "close_mosaic": "close_mosaic",
    "patience": "patience",
    "val_interval": "val_interval",
    "threads": "threads",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `aoi train` / `python -m train`; every flag left out keeps the config-file or default value."""
    parser.add_argument("--config", type=Path, help="YAML file of TrainConfig fields (train/configs/*.yaml)")
    parser.add_argument(
        "--model",
        help="variant: yolo11n..x, yolov8n..x, grace-n/s, dysample-n/s, gms2-n/s (aoi models lists them)",
    )
    parser.add_argument("--data", help="VOC folder (IMAGES/, ANNOTATIONS/, splits/) or YOLO data.yaml / its folder")
    parser.add_argument("--epochs", type=int, help="epochs (default 100)")
    parser.add_argument("--imgsz", type=int, help="square input side, multiple of 32 (default 640)")
    parser.add_argument("--batch", type=int, help="total batch size over all processes (default 16)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes per training process (default 2)")
    parser.add_argument("--out", help="run folder (default runs/<model>, suffixed -2, -3, ... if it holds a run)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument(
        "--weights", help="start from this checkpoint's weights (fine-tuning; same variant, layers of matching shape)"
    )
    parser.add_argument("--seed", type=int, help="seed of initialisation, sampling and augmentation (default 0)")
    parser.add_argument("--sampler", choices=["uniform", "ds-cbsm"], help="default: ds-cbsm for grace-*, else uniform")
    parser.add_argument("--box-loss", choices=["ciou", "wiou3"], help="default: the model's (wiou3 for gms2-*)")
    parser.add_argument("--optimizer", choices=["SGD", "AdamW", "auto"], help="default auto (see docs/training.md)")
    parser.add_argument("--lr0", type=float, help="initial learning rate (ignored by --optimizer auto)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on CUDA)")
    parser.add_argument("--close-mosaic", type=int, help="switch mosaic off for the last N epochs (default 10)")
    parser.add_argument("--patience", type=int, help="stop after N epochs without fitness improvement (default 100)")
    parser.add_argument("--val-interval", type=int, help="validate every N epochs and after the last (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any config field, e.g. loss.box=7.5")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from train.config import parse_key_values

    values: dict[str, Any] = {}
    for flag, key in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            values[key] = value
    if getattr(args, "resume", False):
        values["resume"] = True
    if getattr(args, "deterministic", False):
        values["deterministic"] = True
    values.update(parse_key_values(list(getattr(args, "overrides", None) or [])))
    return values


def _configure_logging(level: int) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    from service.log_config import StderrHandler

    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def run(args: argparse.Namespace) -> int:
    """Train; exit code 0 on success, 2 for bad input, 1 for a failure during training."""
    rank = int(os.environ.get("RANK", "0"))
    _configure_logging(logging.INFO if rank == 0 else logging.WARNING)
    from models import CheckpointError
    from train.config import ConfigError, load_config
    from train.dataset import DatasetError
    from train.trainer import Trainer

    if getattr(args, "resume", False) and getattr(args, "weights", None):
        sys.stderr.write(
            "aoi train: error: --weights with --resume: a resumed run continues from last.pt in --out (weights, "
            "optimizer, epoch); drop --weights, or start a new run with it\n"
        )
        return 2
    try:
        cfg = load_config(args.config, _overrides(args))
        trainer = Trainer(cfg)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        sys.stderr.write(f"aoi train: error: {message}\n")
        return 2
    try:
        run_dir = trainer.fit()
    except KeyboardInterrupt:
        sys.stderr.write(f"aoi train: interrupted; continue with --resume --out {trainer.run_dir}\n")
        return 1
    if rank == 0:
        print(f"run folder: {run_dir}")
    return 0
