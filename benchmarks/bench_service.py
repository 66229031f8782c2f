"""Thin wrapper: ``python benchmarks/bench_service.py --bundle DIR [...]`` runs ``aoi bench service --bundle DIR``."""

from __future__ import annotations

import sys

from aoi.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "service", *sys.argv[1:]]))
