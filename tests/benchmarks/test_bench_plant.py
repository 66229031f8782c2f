"""benchmarks/bench_plant.py end to end, briefly: two real services (one forwarding to a real throwaway PostgreSQL),
the saturation rounds, a short outage of the central database under paced load, and the final counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_plant
from benchmarks.bench_forward import find_pg_bin
from tests.synthetic import encode_image

pytestmark = pytest.mark.integration


def test_bench_plant_measures_the_cost_and_the_catch_up(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl not found (.ci/run installs postgresql)")
    image = tmp_path / "frame.png"
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[10:30, 10:30] = (0, 0, 255)
    image.write_bytes(encode_image(frame, "png"))
    out = tmp_path / "plant.json"
    argv = ["--image", str(image), "--bundle", str(bundle_dir), "--clients", "2", "--seconds", "1",
            "--warmup", "0.2", "--rounds", "2", "--variants", "50", "--outage", "2", "--rate", "10",
            "--json", str(out)]  # fmt: skip
    assert bench_plant.main(argv) == 0
    printed = capsys.readouterr().out
    assert "forwarding on / off at saturation" in printed and "caught up in" in printed
    report = json.loads(out.read_text())
    assert len(report["saturation"]["ratios"]) == 2 and all(r > 0 for r in report["saturation"]["ratios"])
    outage = report["outage"]
    assert outage["backlog_after"] == 0 and set(outage["answers"]) == {"ok"}  # every answer a 200, then caught up
    assert outage["backlog_at_end_of_outage"] > 0  # the records sent while it was down waited in the journal
    counts = report["counts"]
    assert counts["central"] == counts["central_distinct_seq"] == counts["journal"] > 0
