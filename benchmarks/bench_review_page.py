"""How fast the review page opens over a large queue, measured in the browser (issue 26: the queue of 10,000 records
in < 1 s, a 5 MP NG image with its boxes in < 500 ms).

    .venv/bin/python -m benchmarks.bench_review_page [--bundle bundles/default --records 10000 --runs 5]

A temporary data folder gets ``--records`` NG records written straight through the records store (what the record
stage of ``/v1/inspect`` writes, without inferring 10,000 images), each with 1-3 boxes of the bundle's classes, and
as the newest record a 2592x1944 JPEG (5 MP; ``--size 5472x3648`` for 20 MP) with 8 boxes, archived. ``aoi serve``
then runs on that folder with a reviewer key (a subprocess on 127.0.0.1), and a headless Chromium at 1280x800
(benchmarks/chromium.py) logs in and loads ``/review`` ``--runs`` times. Read back from the page's own
``performance`` marks (service/http/review_page/review.js): **queue** = navigation start -> the first page of the
queue is in the DOM (``aoi-queue-shown``); **image** = the large image selected -> fetched, decoded and drawn with its
boxes, the next frame begun (the measure ``aoi-image``); **image at** = navigation start -> that drawn frame. The
first load is the browser's first visit (nothing cached); the median is over all runs. Also printed:
``GET /v1/review/queue`` alone (the server's part). Exit status 1 when a load misses a target.

``--serving SECONDS`` then measures serving with the page idle (issue 26: images/s unchanged): ``--clients``
closed-loop clients post a 200x200 JPEG to ``/v1/inspect`` in ``--rounds`` pairs of slices, one with a signed-in
browser showing ``/review`` (idle: the page polls nothing) and one with that browser on ``about:blank``, the order
flipped every round, on the same server in the same run; images/s per slice and the ratio are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

from benchmarks.chromium import chromium, chromium_missing
from benchmarks.loadgen import HttpLoadClient
from benchmarks.server import free_port, log_tail, start_service
from benchmarks.service_bench import _closed_loop, _Load
from service.core.bundle import load_bundle
from service.records.record import InspectionRecord
from service.records.store import RecordStore
from service.settings import RecordsSettings

KEY = "bench-reviewer-key"
BIG = (2592, 1944)  # 5.04 MP (--size changes it: 5472x3648 is 20 MP)
_MARKS = """
const one = (name) => performance.getEntriesByName(name)[0];
return {queue_ms: one("aoi-queue-shown").startTime, image_ms: one("aoi-image").duration,
        image_at_ms: one("aoi-image-drawn").startTime, rows: document.querySelectorAll("#queue li.item").length,
        boxes: Number(document.getElementById("boxes").dataset.count),
        shown: document.getElementById("viewer").dataset.image};
"""


def big_image(size: tuple[int, int], seed: int = 0) -> bytes:
    """A JPEG of ``size`` that compresses like a real frame: textured metal, not a flat colour."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.random((h // 16, w // 16, 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * 90 + rng.normal(60, 12, (h, w, 1))
    ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise SystemExit("cannot encode the large test image")
    return buf.tobytes()


def _record(i: int, image: bytes, size: tuple[int, int], classes: list[str], rng: np.random.Generator,
            received_at: float, boxes: int) -> InspectionRecord:  # fmt: skip
    w, h = size
    dets = []
    for _ in range(boxes):
        c = int(rng.integers(len(classes)))
        x, y = float(rng.uniform(0, w * 0.9)), float(rng.uniform(0, h * 0.9))
        bw, bh = float(rng.uniform(0.02, 0.1) * w), float(rng.uniform(0.02, 0.1) * h)
        dets.append({"class_id": c, "class_name": classes[c], "score": round(float(rng.uniform(0.3, 0.99)), 3),
                     "box_xyxy": [x, y, min(w, x + bw), min(h, y + bh)]})  # fmt: skip
    return InspectionRecord(
        request_id=f"bench-{i:06d}", image_index=0, received_at=received_at, camera_id=f"cam-{i % 4 + 1}",
        part_id=f"part-{i // 3:05d}", filename=None, model_name="bench", model_version="1.0.0",
        model_hash="0" * 16, backend="onnxruntime-cpu", precision="fp32", verdict="NG", detections=dets,
        timings_ms={"total": 10.0}, width=w, height=h, image_sha256=hashlib.sha256(image).hexdigest(),
        image_bytes=len(image), tiled=False, tiles=1,
    )  # fmt: skip


async def fill_records(data_dir: Path, n: int, classes: list[str], size: tuple[int, int]) -> float:
    """``n`` small NG records, then the large one (``size``) as the newest; returns the seconds it took."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    ok, small = cv2.imencode(".jpg", np.full((480, 640, 3), 80, np.uint8))
    assert ok
    thumb = small.tobytes()
    store = RecordStore(RecordsSettings(durability="fast", max_pending=n + 10), data_dir, sweep_interval_s=3600)
    store.start()
    now = time.time()
    for start in range(0, n, 1000):
        batch = [(_record(i, thumb, (640, 480), classes, rng, now - 3 * (n - i), 1 + i % 3), thumb)
                 for i in range(start, min(n, start + 1000))]  # fmt: skip
        await store.add(batch)
    big = big_image(size)
    await store.add([(_record(n, big, size, classes, rng, now, 8), big)])
    await store.close(120.0)
    return time.perf_counter() - t0


def _until_ready(url: str, proc: subprocess.Popen[bytes], log: Any) -> None:
    t_end = time.monotonic() + 180
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited: {log_tail(log)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the service was not ready in 180 s: {log_tail(log)}")


def _api_queue_ms(url: str, runs: int = 10) -> float:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            r = client.get("/v1/review/queue")
            times.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
    return statistics.median(times)


def browser_runs(url: str, runs: int) -> list[dict[str, Any]]:
    """Log in once, then load /review ``runs`` times; the page's marks of each load."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    done = "return document.body.dataset.ready === '1' && document.getElementById('viewer').dataset.drawn === '1'"
    out = []
    with chromium(1280, 800) as driver:
        driver.get(f"{url}/review/login")
        driver.find_element(By.ID, "reviewer").send_keys("bench")
        driver.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
        WebDriverWait(driver, 60, 0.02).until(lambda d: d.execute_script(done), "the first load")
        out.append(driver.execute_script(_MARKS))  # the first visit: nothing cached
        for _ in range(runs - 1):
            driver.get(f"{url}/review")
            WebDriverWait(driver, 60, 0.02).until(lambda d: d.execute_script(done), "a load")
            out.append(driver.execute_script(_MARKS))
    return out


def _summary(runs: list[dict[str, Any]], api_ms: float, n: int, fill_s: float) -> dict[str, Any]:
    med = {k: statistics.median(float(r[k]) for r in runs) for k in ("queue_ms", "image_ms", "image_at_ms")}
    return {
        "records": n + 1, "fill_s": round(fill_s, 1), "runs": len(runs),
        "first_load": {k: round(float(runs[0][k]), 1) for k in ("queue_ms", "image_ms", "image_at_ms")},
        "median": {k: round(v, 1) for k, v in med.items()}, "api_queue_ms_median": round(api_ms, 1),
        "rows_shown": runs[-1]["rows"], "boxes_on_image": runs[-1]["boxes"], "image": runs[-1]["shown"],
        "queue_under_1s": max(r["queue_ms"] for r in runs) < 1000,
        "image_under_500ms": max(r["image_ms"] for r in runs) < 500,
    }  # fmt: skip


def _sign_in(driver: Any, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    done = "return document.body.dataset.ready === '1' && document.getElementById('viewer').dataset.drawn === '1'"
    driver.get(f"{url}/review/login")
    driver.find_element(By.ID, "reviewer").send_keys("bench")
    driver.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
    WebDriverWait(driver, 60, 0.02).until(lambda d: d.execute_script(done), "the page")


async def _slices(port: int, driver: Any, url: str, seconds: float, rounds: int, clients: int) -> dict[str, Any]:
    image = big_image((200, 200), seed=3)
    client = HttpLoadClient("127.0.0.1", port, max_connections=clients * 2 + 4)
    request = client.build_request("POST", "/v1/inspect", client.host, image, "image/jpeg")
    loads = {"page idle": _Load(), "no page": _Load()}
    per_round = []
    try:
        await _closed_loop(client, request, clients, 2.0, _Load())  # warm-up, not counted
        for r in range(rounds):
            rates = {}
            for name in ("page idle", "no page") if r % 2 == 0 else ("no page", "page idle"):
                if name == "page idle":
                    _sign_in(driver, url)  # the page open and drawn, then left alone
                else:
                    driver.get("about:blank")
                before = loads[name].ok_in_window
                await _closed_loop(client, request, clients, seconds / rounds / 2, loads[name])
                rates[name] = (loads[name].ok_in_window - before) / (seconds / rounds / 2)
            per_round.append({k: round(v, 1) for k, v in rates.items()})
            print(f"round {r + 1}: page idle {rates['page idle']:.1f} images/s, no page {rates['no page']:.1f}")
    finally:
        await client.close()
    idle, none = (sum(x[k] for x in per_round) for k in ("page idle", "no page"))
    return {"rounds": per_round, "page_idle_over_no_page": round(idle / none, 3) if none else None,
            "errors": {k: v.summary(concurrency=clients).get("errors") for k, v in loads.items()}}  # fmt: skip


def serving_with_page_idle(url: str, port: int, seconds: float, rounds: int, clients: int) -> dict[str, Any]:
    """Images/s of ``/v1/inspect`` with a signed-in browser idle on /review vs on about:blank, interleaved."""
    with chromium(1280, 800) as driver:
        return asyncio.run(_slices(port, driver, url, seconds, rounds, clients))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    p.add_argument("--records", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--size", default=f"{BIG[0]}x{BIG[1]}", help="the large image, WIDTHxHEIGHT (default 5 MP)")
    p.add_argument("--serving", type=float, default=0.0, help="seconds of serving load with/without the page idle")
    p.add_argument("--rounds", type=int, default=4, help="pairs of serving slices (--serving)")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients of the serving load (--serving)")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    if len(size) != 2:
        p.error("--size: WIDTHxHEIGHT")
    if (why := chromium_missing()) is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    classes = list(load_bundle(args.bundle).classes)
    with tempfile.TemporaryDirectory(prefix="aoi-bench-review-") as tmp:
        data = Path(tmp) / "data"
        fill_s = asyncio.run(fill_records(data, args.records, classes, (size[0], size[1])))
        port, serving = free_port(), None
        settings = {"DATA_DIR": str(data), "AUTH__REVIEWER_KEYS": json.dumps([KEY]), "DECODE_WORKERS": "1"}
        with (Path(tmp) / "service.log").open("w+b") as log:
            proc = start_service(args.bundle, port, log, settings)
            try:
                url = f"http://127.0.0.1:{port}"
                _until_ready(url, proc, log)
                api_ms = _api_queue_ms(url)
                runs = browser_runs(url, args.runs)
                serving = (
                    serving_with_page_idle(url, port, args.serving, args.rounds, args.clients) if args.serving else None
                )
            finally:
                proc.terminate()
                proc.wait(30)
    summary = {"image_size": f"{size[0]}x{size[1]}", **_summary(runs, api_ms, args.records, fill_s)}
    for i, r in enumerate(runs):
        times = f"queue {r['queue_ms']:.0f} ms, image {r['image_ms']:.0f} ms (drawn at {r['image_at_ms']:.0f} ms)"
        print(f"load {i + 1}: {times}")
    if serving is not None:
        summary["serving"] = serving
    print(json.dumps(summary, indent=2))
    return 0 if summary["queue_under_1s"] and summary["image_under_500ms"] else 1


if __name__ == "__main__":
    sys.exit(main())
