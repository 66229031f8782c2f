"""`aoi bench service` end to end on the synthetic bundle, and its argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aoi.cli import main


@pytest.mark.integration
def test_bench_service_prints_table_and_json(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "service", "--bundle", str(bundle_dir), "--backend", "onnxruntime-cpu", "--duration", "1"]
    rc = main([*args, "--rounds", "2", "--concurrency", "2", "--max-batch-size", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "service/raw throughput ratio at saturation" in text and "p99 at half saturation" in text
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["raw"]["rows"]] == [1, 2]
    assert all(r["images_per_s"] > 0 and r["latency_ms_p50"] > 0 for r in result["raw"]["rows"])
    inter = result["http"]["interleaved_raw"]
    assert len(inter["rounds"]) == 2 and inter["batch"] in (1, 2) and inter["batch1_alone_latency_ms_p50"] > 0
    svc = result["http"]["service"]
    assert svc["backend"] == "onnxruntime-cpu" and svc["max_delay_ms"] == 0.0
    assert svc["instances"] == result["raw"]["info"]["instances"] >= 1
    for phase in ("saturation", "half_saturation"):
        h = result["http"][phase]
        assert h["requests_ok"] > 0 and h["errors"] == {} and h["latency_ms"]["p50"] <= h["latency_ms"]["p99"]
    sat = result["http"]["saturation"]["images_per_s"]
    assert result["targets"]["ratio"] == pytest.approx(sat / inter["images_per_s"])
    p99 = result["http"]["half_saturation"]["latency_ms"]["p99"]
    assert result["targets"]["p99_over_raw_b1"] == pytest.approx(p99 / inter["batch1_alone_latency_ms_p50"])


def test_bench_rejects_bad_arguments(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "service", "--bundle", str(bundle_dir), "--concurrency", "0"]) == 2
    assert "--concurrency and --rounds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "service", "--bundle", str(bundle_dir), "--max-delay-ms", "soon"])
    assert exc.value.code == 2 and "neither 'auto' nor a number" in capsys.readouterr().err
    assert main(["bench", "service", "--bundle", str(bundle_dir / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["bench", "service", "--bundle", str(bundle_dir), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size 1..256" in capsys.readouterr().err
    assert main(["bench", "service", "--bundle", str(bundle_dir), "--json", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a directory" in capsys.readouterr().err
    not_an_image = tmp_path / "frame.jpg"
    not_an_image.write_bytes(b"this is not a JPEG")
    assert main(["bench", "service", "--bundle", str(bundle_dir), "--image", str(not_an_image)]) == 1
    assert f"{not_an_image}: the service would reject it:" in capsys.readouterr().err
