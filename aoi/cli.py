"""`aoi` console script: dispatches to the subcommand modules of service/, benchmarks/, models/, export/ and train/.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and must not import torch at module
level, so ``aoi serve`` and ``aoi --help`` work in the torch-free runtime image.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

# name -> (module, one-line help). Modules are imported only when their subcommand runs or help is built.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.cli.serve", "run the inspection HTTP service on a model bundle"),
    "bench": ("benchmarks.service_bench", "benchmark the raw backend against the HTTP service"),
    "models": ("models.cli", "list the model variants with parameter count and GFLOPs"),
    "export": ("export.cli", "export a checkpoint to an ONNX (+ TensorRT) model bundle"),
    "calibrate-reviews": (
        "export.recalibrate_cli",
        "re-fit a bundle's per-class score thresholds from the review decisions (prints first, writes on request)",
    ),
    "train": ("train.cli", "train a detector on a VOC or YOLO dataset"),
    "val": ("train.val_cli", "evaluate a checkpoint or a bundle with the COCO protocol"),
    "predict": ("service.cli.predict", "run a bundle over a folder of images (tiled as served): JSON + NG pictures"),
    "records": (
        "service.cli.records",
        "export, show or check the inspection records and archived images; reviewed images as a training dataset",
    ),
}


def _build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aoi", description="Defect-inspection models, export and serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # Only the selected subcommand's module is imported: a missing optional extra (torch for `aoi train`)
        # must not break `aoi serve`.
        if name == selected:
            importlib.import_module(module_name).add_arguments(sp)
    return parser


# A flag that hands a subcommand's parsed arguments to another module: (subcommand, flag) -> module.
_FLAG_MODULES = {("bench", "cpu"): "benchmarks.bench_cpu"}

# Optional packages -> the extra of pyproject.toml that brings them (`make serve` installs only the runtime one).
_EXTRAS = {
    "torch": "train", "onnx": "train", "onnxslim": "train", "onnxscript": "train", "matplotlib": "train",
    "tqdm": "train", "nncf": "train", "onnxruntime": "cpu", "openvino": "cpu", "tensorrt": "gpu", "pycocotools": "dev",
    "psutil": "dev", "psycopg": "plant", "alembic": "plant", "sqlalchemy": "plant", "boto3": "plant",
    "botocore": "plant",
}  # fmt: skip


def _missing(command: str | None, exc: ModuleNotFoundError) -> int:
    """``aoi <cmd>: missing dependency`` with the one command that installs it, instead of a traceback."""
    name = (exc.name or "").split(".")[0]
    extra = _EXTRAS.get(name)
    if extra is None:
        raise exc  # not an optional dependency: a real bug, keep its traceback
    pip = Path(sys.executable).parent / "pip"
    sys.stderr.write(
        f"aoi {command}: missing dependency '{name}' (the '{extra}' extra; `make serve` installs only what serving "
        f"needs). Install it with:\n  {pip} install -e '.[{extra}]'\n"
    )
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected not in SUBCOMMANDS:
        selected = None
    try:
        parser = _build_parser(selected)
    except ModuleNotFoundError as exc:
        return _missing(selected, exc)
    args = parser.parse_args(argv)
    name = next((m for (c, f), m in _FLAG_MODULES.items() if c == args.command and getattr(args, f, False)), None)
    module = importlib.import_module(name or SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args))
    except ModuleNotFoundError as exc:  # a subcommand imports its heavy dependencies inside run()
        return _missing(args.command, exc)


if __name__ == "__main__":
    raise SystemExit(main())
