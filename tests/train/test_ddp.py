"""DDP smoke test: `torchrun` with 2 CPU processes (gloo) trains one epoch; rank 0 writes the run folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.train.conftest import make_voc_dataset

pytestmark = pytest.mark.slow


def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    data = make_voc_dataset(tmp_path / "voc", 8, 2, size=64, max_objects=2)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "train", "--model", "yolo11n", "--data", str(data), "--epochs", "1", "--imgsz", "64", "--batch", "4",
        "--workers", "0", "--out", str(out), "--sampler", "ds-cbsm", "--device", "cpu", "dscbsm.refresh=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((out / "config.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["batches_per_epoch"] == 2  # 8 images / 2 ranks / 2 per rank
    assert len((out / "results.csv").read_text().splitlines()) == 2  # header + one epoch, written once (rank 0)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and not any(k.startswith("module.") for k in ckpt["model_state"])
    assert ckpt["sampler"]["batches"] == 2 and bool(ckpt["sampler"]["g_seen"].any())
