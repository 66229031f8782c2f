"""`aoi models` and the FLOP counter behind it."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models
from models import cli
from models.flops import count_flops


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flops_match_torch_counter(built) -> None:
    """Our hooks (Conv2d, Linear, attention matmuls) count what torch's own FLOP counter counts."""
    model = built("yolo11n")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 128, 128))
    assert count_flops(model, 128) == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-6)
    # FLOPs grow with the pixel count, attention slightly faster
    assert 24.5 < count_flops(model, 640) / count_flops(model, 128) < 25.5


def test_json_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(_args("--json", "--nc", "80", "--imgsz", "64")) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(models.VARIANTS)
    assert all(set(r) == {"name", "params", "gflops"} for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["yolo11n"]["params"] == 2_624_080 and by_name["yolo11s"]["params"] == 9_458_752
    assert 0 < by_name["yolo11n"]["gflops"] < by_name["yolo11s"]["gflops"]


def test_table_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(_args("--imgsz", "64")) == 0
    out = capsys.readouterr().out
    assert "2,591,010" in out and "gms2-n" in out and "wiou3" in out


@pytest.mark.parametrize(("argv", "field"), [(["--nc", "0"], "--nc"), (["--imgsz", "100"], "--imgsz")])
def test_bad_arguments(argv: list[str], field: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(_args(*argv)) == 2
    assert f"aoi models: error: {field}" in capsys.readouterr().err
