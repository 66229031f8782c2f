"""`python -m service [--bundle DIR ...]`: the same as `aoi serve`."""

from __future__ import annotations

import argparse

from service.cli.serve import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m service", description="Run the inspection HTTP service.")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
