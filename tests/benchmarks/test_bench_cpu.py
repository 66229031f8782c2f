"""`aoi bench service --cpu`: the CPU-time accounting, the py-spy profile parsing and the stage and thread splits on
canned input, the table, and the routing of the flag (no service is started, nothing is timed)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from aoi.cli import main
from benchmarks.cpu_profile import (
    EXITED,
    RUNTIME,
    CpuReading,
    CpuTally,
    parse_dump,
    parse_raw,
    stage_of,
    stage_split,
    thread_split,
    unplaced,
)

SVC = "/work/main/service"
LIB = "/venv/lib/python3.11/site-packages"


def test_tally_sums_slices_and_keeps_what_exited_threads_spent() -> None:
    tally = CpuTally()
    assert math.isnan(tally.ms_per_image()) and tally.thread_ms() == {}
    # slice 1: 10 images, 0.5 s of CPU; thread 11 did 0.2 s, thread 12 0.25 s, 0.05 s went to a thread that exited
    tally.add(CpuReading(1.0, {10: 0.5, 11: 0.1, 12: 0.0}), CpuReading(1.5, {10: 0.5, 11: 0.3, 12: 0.25}), 10)
    # slice 2: 30 images, 1.5 s; thread 13 was born in between and counts from 0
    tally.add(CpuReading(2.0, {11: 0.3, 12: 0.25}), CpuReading(3.5, {11: 1.0, 12: 0.55, 13: 0.5}), 30, model_s=1.2)
    assert tally.images == 40 and tally.ms_per_image() == pytest.approx(50.0)
    assert tally.model_ms_per_image() == pytest.approx(30.0)  # 1.2 s inside the backend's call over 40 images
    ms = tally.thread_ms()
    assert ms[10] == pytest.approx(0.0) and ms[11] == pytest.approx(22.5) and ms[12] == pytest.approx(13.75)
    assert ms[13] == pytest.approx(12.5) and ms[-1] == pytest.approx(1.25)
    assert sum(ms.values()) == pytest.approx(tally.ms_per_image())
    merged = CpuTally()
    merged.merge(tally)
    merged.merge(tally)
    assert merged.images == 80 and merged.ms_per_image() == pytest.approx(50.0) and merged.thread_ms() == ms
    assert merged.model_ms_per_image() == pytest.approx(30.0)


DUMP = """Process 100: /venv/bin/python -m service --bundle bundles/default
Python v3.11.7 (/usr/bin/python3.11)

Thread 100 (idle): "MainThread"
    select (selectors.py:468)
Thread 104 (active): "aoi-infer_0"
    _run (/work/main/service/backends/openvino_backend.py:199)
Thread 107 (idle): "records-writer"
    wait (threading.py:327)
"""

ROUTE = f"inspect ({SVC}/http/routes/inspect.py:90);dumps_json ({LIB}/pydantic/main.py:400)"
RAW = f"""thread (100): MainThread;run (asyncio/runners.py:118);decode_frame ({SVC}/core/preprocess.py:80) 30
thread (100): MainThread;run (asyncio/runners.py:118);{ROUTE} 50
thread (100): MainThread;_run_once (/usr/lib/python3.11/asyncio/base_events.py:1922) 20
thread (104): aoi-infer_0;_work ({SVC}/inference/batching.py:300);assemble_rows ({SVC}/core/frames.py:200) 25
thread (104): aoi-infer_0;_work ({SVC}/inference/batching.py:300);_run ({SVC}/backends/openvino_backend.py:199) 50
thread (104): aoi-infer_0;nms ({SVC}/core/postprocess.py:120) 25
a line that is no sample
thread (107): records-writer;_step ({SVC}/records/store.py:99);execute ({LIB}/sqlite3/dbapi2.py:1) 10
"""


def test_parse_dump_and_raw_profile() -> None:
    assert parse_dump(DUMP) == {100: "MainThread", 104: "aoi-infer_0", 107: "records-writer"}
    samples = parse_raw(RAW)
    assert [(s.tid, s.thread, s.count) for s in samples][:2] == [(100, "MainThread", 30), (100, "MainThread", 50)]
    assert len(samples) == 7 and sum(s.count for s in samples) == 210
    assert samples[0].frames == (("run", "asyncio/runners.py"), ("decode_frame", f"{SVC}/core/preprocess.py"))


def test_stage_of_takes_the_innermost_service_frame_then_the_library() -> None:
    s = parse_raw(RAW)
    assert [stage_of(x.frames) for x in s] == [
        "decode",
        "JSON / HTTP",  # pydantic under the inspect route
        "queue / hand-off / event loop",  # the event loop itself
        "preprocess (rows, letterbox)",
        "inference",
        "postprocess (NMS, merge, verdict)",
        "records",
    ]
    assert stage_of([("f", "/somewhere/else.py")]) == "other"
    serve = ("serve", f"{SVC}/cli/serve.py")  # the entry point under the event loop decides nothing
    assert stage_of([serve, ("data_received", f"{LIB}/uvicorn/protocols/http/httptools_impl.py")]) == "JSON / HTTP"
    main_module = ("<module>", f"{SVC}/__main__.py")  # outside the entry point: not a stage either
    assert stage_of([main_module, serve]) == "event loop, native (uvloop, httptools)"
    assert stage_of([("spin", f"{LIB}/prometheus_client/metrics.py")]) == "metrics"


def test_unplaced_names_the_frames_no_rule_placed() -> None:
    extra = f"thread (100): MainThread;tick ({SVC}/lifecycle/memory.py:10) 40\nthread (9): x;f (/else.py:1) 10\n"
    extra += "thread (9): x;g (/root/.pyenv/versions/3.11.7/lib/python3.11/contextlib.py:3) 5\n"
    top = unplaced(parse_raw(RAW + extra))
    # the machine's folders never reach the results: from the package or the standard library on
    assert top == [
        ("tick (lifecycle/memory.py)", pytest.approx(40 / 265)),
        ("f (else.py)", pytest.approx(10 / 265)),
        ("g (contextlib.py)", pytest.approx(5 / 265)),
    ]


def test_stage_split_shares_each_threads_cpu_over_its_samples() -> None:
    names = parse_dump(DUMP)
    per_thread = {100: 2.0, 104: 1.0, 107: 0.4, 110: 5.0, 111: 0.3, -1: 0.1}
    names[111] = "aoi-decode_0"  # a Python thread never sampled busy
    split = stage_split(parse_raw(RAW), per_thread, names)
    assert split["inference"] == pytest.approx(5.0 + 0.5)  # 110 has no Python frames: the runtime's thread
    assert split["decode"] == pytest.approx(0.6) and split["JSON / HTTP"] == pytest.approx(1.0)
    assert split["queue / hand-off / event loop"] == pytest.approx(0.4) and split["records"] == pytest.approx(0.4)
    assert split["preprocess (rows, letterbox)"] == pytest.approx(0.25)
    assert split["unsampled"] == pytest.approx(0.3) and split[EXITED] == pytest.approx(0.1)
    assert sum(split.values()) == pytest.approx(sum(per_thread.values()))
    assert next(iter(split)) == "inference"  # largest first


def test_thread_split_by_role() -> None:
    split = thread_split(
        {100: 2.0, 104: 1.0, 105: 0.5, 107: 0.4, 110: 5.0, -1: 0.1}, {**parse_dump(DUMP), 105: "aoi-infer_1"}
    )
    assert split == {
        RUNTIME: 5.0,
        "event loop (HTTP, JSON, small decodes, results)": 2.0,
        "aoi-infer threads (rows, backend call, NMS)": 1.5,
        "records writer": 0.4,
        EXITED: 0.1,
    }


def _result() -> dict[str, Any]:
    mode = {
        "images_per_s": 160.0,
        "errors": 0,
        "cpu_ms_per_image": 9.6,
        "model_ms_per_image": 6.6,
        "outside_ms_per_image": 3.0,
        "outside_ms_per_round": [2.9, 3.1],
        "outside_by_subtraction_ms_per_image": 3.4,
        "ratio": 0.55,
        "ratio_per_round": [0.5, 0.6],
        "threads_ms": {RUNTIME: 6.0, "event loop (HTTP, JSON, small decodes, results)": 3.6},
        "stages_ms": {"inference": 7.0, "JSON / HTTP": 1.5, "decode": 1.1},
        "profile": {"samples": 900, "seconds": 5, "cpu_ms_per_image_while_profiled": 9.9},
    }
    return {
        "image": "scratches_10.jpg (1 model input(s))",
        "model_inputs_per_image": 1,
        "model": {
            "backend": "openvino",
            "device": "CPU",
            "precision": "bf16",
            "instances": 2,
            "batch_sizes": [1, 2, 4, 8],
            "max_delay_ms": 0.0,
        },
        "concurrency": 32,
        "raw_layouts": [
            {"instances": 1, "batch": 1, "images_per_s": 120.0, "cpu_ms_per_image": 8.0},
            {"instances": 2, "batch": 8, "images_per_s": 290.0, "cpu_ms_per_image": 6.6},
        ],
        "best_layout": {
            "instances": 2,
            "batch": 8,
            "images_per_s": 290.0,
            "cpu_ms_per_image": 6.6,
            "images_per_s_interleaved": 295.0,
            "cpu_ms_per_image_interleaved": 6.6,
        },
        "modes": {"durable": mode, "fast": {**mode, "errors": 2}, "off": {**mode, "stages_ms": {}}},
        "rounds": [{}, {}, {}],
        "half_saturation": {
            "offered_rate": 80.0,
            "p50_ms": 10.0,
            "p99_ms": 30.0,
            "errors": 0,
            "raw_batch1_ms_p50": 8.3,
            "p99_over_raw_b1": 3.61,
        },
        "frame": {
            "size": [2448, 2048],
            "tiles": 224,
            "frames": 5,
            "e2e_s_p50": 1.0,
            "raw_s_for_tiles": 0.75,
            "e2e_over_raw": 1.33,
            "cpu_ms_per_frame": 1700.0,
            "outside_ms_per_tile": 0.99,
        },
        "floor": {
            "http_asgi_ms": 0.09,
            "http_fastapi_ms": 0.37,
            "paced_rate": 110.0,
            "http_asgi_paced_ms": 0.35,
            "http_fastapi_paced_ms": 0.97,
            "decode_ms_alone": 0.2,
            "letterbox_ms_alone": 0.29,
            "decode_ms_beside_model": 0.41,
            "letterbox_ms_beside_model": 0.5,
            "floor_ms": 1.0,
            "floor_with_fastapi_ms": 1.28,
            "floor_paced_ms": 1.26,
            "floor_paced_with_fastapi_ms": 1.88,
        },
        "profiler": "py-spy",
    }


def test_table_names_every_figure() -> None:
    from benchmarks.bench_cpu import _table

    text = _table(_result())
    assert "2 instance(s) x batch 8" in text and "<- best" in text and "service, records durable" in text
    assert "2 errors" in text and "by stage (py-spy" in text
    assert "inference (the backend's call, model included)" in text
    assert "p99 / raw batch 1 = 3.61" in text and "line frame 2448x2048 (224 tiles" in text
    assert "at least 1.00 ms (1.28 with FastAPI), at the service's rate 1.26 (1.88)" in text
    assert "at the service's 110 requests/s: 0.35 and 0.97" in text
    assert "6.60      3.00 (rounds 2.90..3.10)" in text and "durable 3.40" in text  # in / outside; by subtraction
    # the stage shares are of the CPU outside the model; inference, which holds the model, has none
    assert "1.50 ( 50%)" in text and "7.00       " in text and "7.00 (" not in text


def test_cpu_flag_routes_to_bench_cpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import benchmarks.bench_cpu
    import benchmarks.service_bench

    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(benchmarks.bench_cpu, "run", lambda args: seen.append(args) or 0)
    monkeypatch.setattr(benchmarks.service_bench, "run", lambda args: 7)
    assert main(["bench", "service", "--cpu", "--frame", "2448x2048", "--profile-s", "0"]) == 0
    assert seen[0].frame == (2448, 2048) and seen[0].profile_s == 0
    assert main(["bench", "service"]) == 7  # without the flag: the usual benchmark
    with pytest.raises(SystemExit) as exc:
        main(["bench", "service", "--cpu", "--frame", "2448"])
    assert exc.value.code == 2 and "is not WIDTHxHEIGHT" in capsys.readouterr().err


@pytest.mark.integration
def test_bench_cpu_end_to_end_on_the_synthetic_bundle(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cpu.json"
    args = ["bench", "service", "--cpu", "--bundle", str(bundle_dir), "--backend", "onnxruntime-cpu"]
    rc = main([*args, "--duration", "1", "--rounds", "2", "--max-batch-size", "2", "--profile-s", "1"])
    rc = rc or main([*args, "--duration", "1", "--rounds", "1", "--max-batch-size", "2", "--profile-s", "1",
                     "--frame", "640x480", "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "<- best" in text and "service, records off" in text and "p99 / raw batch 1" in text
    result = json.loads(out.read_text())
    assert result["model"]["backend"] == "onnxruntime-cpu" and set(result["modes"]) == {"durable", "fast", "off"}
    assert {(r["instances"], r["batch"]) for r in result["raw_layouts"]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(r["images_per_s"] > 0 and r["cpu_ms_per_image"] > 0 for r in result["raw_layouts"])
    for mode in result["modes"].values():
        assert mode["errors"] == 0 and mode["images_per_s"] > 0 and mode["cpu_ms_per_image"] > 0
        # the model's CPU is counted inside the service, and is part of the process's CPU
        assert 0 < mode["model_ms_per_image"] < mode["cpu_ms_per_image"]
        assert mode["outside_ms_per_image"] == pytest.approx(mode["cpu_ms_per_image"] - mode["model_ms_per_image"])
        # the thread split is the process's CPU (kernel accounting; the two are read a moment apart)
        assert sum(mode["threads_ms"].values()) == pytest.approx(mode["cpu_ms_per_image"], rel=0.05)
        if "stages_ms" in mode:  # py-spy installed and allowed to read the process
            assert sum(mode["stages_ms"].values()) == pytest.approx(mode["cpu_ms_per_image"], rel=0.05)
    floor = result["floor"]  # the bare servers answered, the image was decoded and letterboxed
    assert min(floor["http_asgi_ms"], floor["http_fastapi_ms"], floor["decode_ms_beside_model"]) > 0
    assert min(floor["http_asgi_paced_ms"], floor["http_fastapi_paced_ms"]) > 0 and floor["paced_rate"] > 0
    assert floor["floor_ms"] == pytest.approx(
        floor["http_asgi_ms"] + floor["decode_ms_beside_model"] + floor["letterbox_ms_beside_model"]
    )
    assert "floor on this machine" in text
    assert result["frame"]["tiles"] >= 1 and result["frame"]["e2e_s_p50"] > 0
    assert 0 < result["frame"]["model_ms_per_frame"] < result["frame"]["cpu_ms_per_frame"]
    assert result["half_saturation"]["p99_ms"] >= result["half_saturation"]["p50_ms"] > 0
