"""Bookkeeping of a run: its folder, validation of the EMA model, `results.csv`, the RNG snapshot of a checkpoint."""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from train.config import TrainConfig
    from train.dataset import DatasetSplit
    from train.evaluate import EvalResult

__all__ = [
    "RESULT_COLUMNS",
    "ResultsLog",
    "fitness",
    "resolve_run_dir",
    "rng_state",
    "run_validation",
    "set_rng_state",
]

RESULT_COLUMNS = [
    "epoch",
    "train/box_loss",
    "train/cls_loss",
    "train/dfl_loss",
    "metrics/precision",
    "metrics/recall",
    "metrics/mAP50",
    "metrics/mAP50-95",
    "fitness",
    "lr/pg0",
    "lr/pg1",
    "lr/pg2",
    "time/epoch_s",
]


def fitness(map50: float, map50_95: float) -> float:
    """Checkpoint selection score: 0.1 mAP50 + 0.9 mAP50-95 (docs/models.md, design note D4)."""
    return 0.1 * map50 + 0.9 * map50_95


@torch.no_grad()
def run_validation(
    model: nn.Module, split: DatasetSplit, cfg: TrainConfig, device: torch.device
) -> tuple[dict[str, Any], EvalResult]:
    """Evaluate `model` (the EMA copy) on `split` with the COCO protocol: (the numbers the run logs, full result)."""
    from train.evaluate import evaluate_model

    was_training = model.training
    model.eval()
    result, _ = evaluate_model(model, split, imgsz=cfg.imgsz, batch_size=cfg.val_batch, device=str(device))
    model.train(was_training)
    metrics = {
        "precision": float(result.precision),
        "recall": float(result.recall),
        "map50": float(result.map50),
        "map50_95": float(result.map50_95),
        "fitness": fitness(float(result.map50), float(result.map50_95)),
    }
    return metrics, result


class ResultsLog:
    """Appends one row per epoch to `results.csv` (rank 0 only): losses, val metrics, lrs, DS-CBSM++ class weights.

    Epochs without validation (`--val-interval`) leave the metric cells empty.
    """

    def __init__(self, path: Path, class_names: Sequence[str], *, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self.columns = RESULT_COLUMNS + [f"class_weight/{name}" for name in class_names]

    def append(
        self,
        epoch: int,
        losses: Sequence[float],
        metrics: dict[str, Any] | None,
        lrs: Sequence[float],
        seconds: float,
        class_weights: Sequence[float] | None,
    ) -> None:
        if not self.enabled:
            return
        m = metrics or {}
        cells: list[Any] = [epoch, *(f"{v:.5f}" for v in losses)]
        cells += [_fmt(m.get(k)) for k in ("precision", "recall", "map50", "map50_95", "fitness")]
        cells += [f"{lr:.6g}" for lr in (list(lrs) + [math.nan] * 3)[:3]]
        cells.append(f"{seconds:.2f}")
        n_weights = len(self.columns) - len(RESULT_COLUMNS)
        cells += [f"{w:.5f}" for w in class_weights] if class_weights is not None else [""] * n_weights
        new = not self.path.exists()
        with self.path.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(self.columns)
            writer.writerow(cells)


def resolve_run_dir(cfg: TrainConfig) -> Path:
    """The run folder: `out` (or runs/<model>); without --resume an existing run gets a -2, -3, ... suffix."""
    base = Path(cfg.out) if cfg.out else Path("runs") / cfg.model
    if cfg.resume:
        return base
    candidate, k = base, 2
    while (candidate / "last.pt").exists() or (candidate / "results.csv").exists():
        candidate, k = base.with_name(f"{base.name}-{k}"), k + 1
    return candidate


def rng_state() -> dict[str, Any]:
    """Global torch / python / numpy (/ CUDA) generator states as tensors and plain lists (weights_only-loadable)."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": [np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.5f}"
