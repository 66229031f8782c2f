"""``aoi models``: list the model variants with parameter count and GFLOPs at a given input size and class count."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nc", type=int, default=6, help="number of classes (default 6, NEU-DET)")
    parser.add_argument("--imgsz", type=int, default=640, help="square input side for GFLOPs, multiple of 32")
    parser.add_argument("--json", action="store_true", help='print a JSON list of {"name", "params", "gflops"}')


def run(args: argparse.Namespace) -> int:
    if args.nc < 1:
        sys.stderr.write(f"aoi models: error: --nc: must be >= 1, got {args.nc}\n")
        return 2
    if args.imgsz < 32 or args.imgsz % 32:
        sys.stderr.write(f"aoi models: error: --imgsz: must be a positive multiple of 32, got {args.imgsz}\n")
        return 2
    # torch-backed imports stay inside run(): `aoi --help` must work in the torch-free service image
    from models import VARIANTS, count_parameters, create_model
    from models.flops import count_flops

    rows = []
    for name in VARIANTS:
        model = create_model(name, nc=args.nc)
        rows.append(
            {
                "name": name,
                "params": count_parameters(model),
                "gflops": round(count_flops(model, args.imgsz), 2),
                "box_loss": model.default_box_loss,
            }
        )
    if args.json:
        print(json.dumps([{k: r[k] for k in ("name", "params", "gflops")} for r in rows], indent=2))
        return 0
    print(f"{'variant':<12} {'params':>12} {f'GFLOPs@{args.imgsz}':>12}  box loss   (nc={args.nc})")
    for r in rows:
        print(f"{r['name']:<12} {r['params']:>12,} {r['gflops']:>12.2f}  {r['box_loss']}")
    return 0
