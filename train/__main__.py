"""`python -m train [--config train/configs/<exp>.yaml] [flags] [key=value ...]`: the same as `aoi train`.

This is also the entry point for multi-GPU runs: `torchrun --nproc_per_node 2 -m train --config ... --device cuda`.
"""

from __future__ import annotations

import argparse

from train.cli import add_arguments, run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train a detector (see docs/training.md).")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
