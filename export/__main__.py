"""``python -m export ...``: the same command as ``aoi export``."""

from __future__ import annotations

import argparse

from export.cli import add_arguments, run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description="Export a checkpoint to a model bundle.")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
