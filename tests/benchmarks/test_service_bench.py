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
    rc = main([*args, "--rounds", "2", "--max-batch-size", "2", "--set", "GC_FREEZE=false", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "service/raw throughput ratio at saturation" in text and "p99 at half saturation" in text
    result = json.loads(out.read_text())
    # auto: a full batch running and one waiting per instance; records durable, as make serve runs
    assert result["concurrency"] == 2 * result["raw"]["info"]["instances"] * 2 and result["records"] == "durable"
    commits = result["http"]["half_saturation"]["records_commits"]
    assert commits["count"] >= 1 and 0 < commits["p50_ms_at_most"] <= commits["p99_ms_at_most"]
    assert result["service_settings"] == {"GC_FREEZE": "false"} and "; GC_FREEZE=false" in text
    assert "records commits (a durable answer waits for its own) at half saturation" in text
    gc_pauses = result["http"]["saturation"]["gc_pauses"]  # requests allocate: the collector runs under load
    assert gc_pauses["count"] >= 1 and gc_pauses["p99_ms_at_most"] <= gc_pauses["max_ms_at_most"]
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
    stages = result["http"]["half_saturation"]["stages_ms"]  # read from every answer's timings_ms
    assert list(stages) == ["decode", "queue", "inference", "postprocess", "total", "outside"]
    assert all(0 <= v["p50"] <= v["p99"] for k, v in stages.items() if k != "outside")
    assert stages["inference"]["p50"] > 0 and stages["total"]["p50"] >= stages["inference"]["p50"]
    assert stages["outside"]["p50"] > 0  # the client's wait includes the HTTP exchange the server does not time
    assert "half saturation per answer, ms p50 / p99: decode " in text and "server total" in text
    assert "stages_ms" not in result["http"]["saturation"]


def test_bench_rejects_bad_arguments(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "service", "--bundle", str(bundle_dir), "--concurrency", "0"])
    assert exc.value.code == 2 and "neither 'auto' nor a number of clients" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "service", "--bundle", str(bundle_dir), "--set", "gc_freeze"])
    assert exc.value.code == 2 and "is not NAME=VALUE" in capsys.readouterr().err
    assert main(["bench", "service", "--bundle", str(bundle_dir), "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
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


def test_histogram_summary_reads_bucket_bounds_between_two_scrapes() -> None:
    from benchmarks.service_bench import _histogram_summary, _histograms

    rows = [
        f'aoi_records_commit_seconds_bucket{{le="{le}"}} {n}'
        for le, n in (("0.001", 60), ("0.01", 108), ("0.02", 109), ("0.05", 110), ("+Inf", 110))
    ]
    rows += [f'aoi_gc_pause_seconds_bucket{{generation="{g}",le="+Inf"}} {n}' for g, n in (("0", 5), ("2", 1))]
    text = "\n".join(
        ["# TYPE aoi_records_commit_seconds histogram", *rows[:5], "# TYPE aoi_gc_pause_seconds histogram", *rows[5:]]
    )
    scraped = _histograms(text + "\n")
    assert scraped["aoi_gc_pause_seconds"] == {float("inf"): 6.0}  # summed over the generations
    after = scraped["aoi_records_commit_seconds"]
    assert after[0.01] == 108 and after[float("inf")] == 110
    # 100 commits between the scrapes: 50 within 1 ms, 48 more within 10 ms, one within 20 ms, one within 50 ms
    before = {0.001: 10.0, 0.01: 10.0, 0.02: 10.0, 0.05: 10.0, float("inf"): 10.0}
    assert _histogram_summary(before, after) == {
        "count": 100, "p50_ms_at_most": 1.0, "p99_ms_at_most": 20.0, "max_ms_at_most": 50.0, "over_10ms": 2,
        "over_20ms": 1, "over_50ms": 0,
    }  # fmt: skip
    assert _histogram_summary(after, after) is None and _histograms("") == {}
