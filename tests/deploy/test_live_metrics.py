"""Live check of the dashboard and the recording rules: the real service (``aoi serve`` on a synthetic bundle, records
on, a webhook sink posting to a receiver in this process, plant records on with a central PostgreSQL that does not
answer) and a real Prometheus (Debian's package) on loopback, a bounded burst of good and bad frames and a few review
decisions, then every dashboard panel query and every recording rule evaluated through Prometheus' HTTP API. Each must
return data.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.deploy.k8s import KUBECTL, POD_TARGET_LABELS, adapter_rule, keda_trigger, render_overlay
from tests.deploy.stack import JOB, PROMETHEUS_CONFIG, REPO, RULES, dashboard_queries, load_yaml, recording_rules
from tests.synthetic import encode_image, make_synthetic_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus")
SIZE = 64  # synthetic bundle input size: frames of this size skip the resize
ROUNDS = 4  # traffic rounds, ~1 s apart so several scrapes see the counters move
GOOD_PER_ROUND = 12  # a third each: black (OK), red patch (NG, class 0), green patch (NG, class 1)


class _Receiver(ThreadingHTTPServer):
    """The webhook's far end (a PLC gateway or MES): acknowledges every verdict POST with 204 and counts them."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Acknowledge)
        self.received = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/verdicts"


class _Acknowledge(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        server = self.server
        assert isinstance(server, _Receiver)
        with server.lock:
            server.received += 1
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # per-request lines would flood the test output


@dataclass(frozen=True)
class Stack:
    prometheus: str  # base URL
    service: str
    good_sent: int
    bad_sent: dict[str, int]  # rejection reason -> requests sent
    webhook: _Receiver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _frame(channel: int | None) -> bytes:
    """A SIZE x SIZE PNG: black, or with a saturated 32 x 32 patch in ``channel`` (the synthetic model's class
    ``channel`` then scores 1.0 over the patch)."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    if channel is not None:
        img[16:48, 16:48, channel] = 255
    return encode_image(img, "png")


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode} before {url} answered:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer 200 within {timeout_s} s:\n{_tail(log)}")


def _tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]) if log.exists() else ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _prometheus_config(tmp: Path, service_port: int) -> Path:
    """The deployed prometheus.yml with loopback targets, 1 s intervals and the real rules file."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    # The target labels a pod scraped through the Kubernetes ServiceMonitor gets (deploy/k8s): the autoscaling
    # queries select on them; the dashboard queries and rules ignore them.
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"], "labels": POD_TARGET_LABELS}]
    config["scrape_configs"] = [job]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _send_traffic(base: str) -> tuple[int, dict[str, int]]:
    frames = [_frame(None), _frame(0), _frame(1)]
    bad = {
        "empty_body": (b"", "image/png"),
        "invalid_image": (b"this is not an image", "image/jpeg"),
        "unsupported_media_type": (frames[0], "text/plain"),
    }
    good = 0
    with httpx.Client(base_url=base, timeout=10.0) as client, ThreadPoolExecutor(max_workers=4) as pool:

        def post(body: bytes, ctype: str, query: str = "") -> int:
            return client.post("/v1/inspect" + query, content=body, headers={"Content-Type": ctype}).status_code

        def good_one(i: int) -> int:  # the blank frame goes through the tiled path (the tiled-frame panels need it)
            return post(frames[i % 3], "image/png", "?tiling=on" if i % 3 == 0 else "")

        for _ in range(ROUNDS):
            started = time.monotonic()
            codes = list(pool.map(good_one, range(GOOD_PER_ROUND)))
            assert codes == [200] * GOOD_PER_ROUND, codes
            good += GOOD_PER_ROUND
            for body, ctype in bad.values():
                code = post(body, ctype)
                assert 400 <= code < 500, (ctype, code)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    return good, {reason: ROUNDS for reason in bad}


REVIEW_ROUNDS = 2  # the review counters must move between two scrapes for the 1 h increases (and their ratio)


def _review(base: str) -> dict[str, int]:
    """What a reviewer at /review does (no keys: a loopback caller), in two rounds a few scrapes apart: a scratch
    confirmed, a dent called false, a defect drawn on an OK image (an escape). Returns the decisions posted."""
    posted = {"confirmed": 0, "false_call": 0, "corrected": 0}
    with httpx.Client(base_url=base, timeout=10.0) as client:
        ng = client.get("/v1/review/queue", params={"limit": 500}).json()["items"]
        ok = client.get("/v1/review/queue", params={"verdict": "OK", "limit": 500}).json()["items"]
        scratch = [i for i in ng if {d["class_name"] for d in i["detections"]} == {"scratch"}]
        dent = [i for i in ng if {d["class_name"] for d in i["detections"]} == {"dent"}]
        assert len(scratch) >= REVIEW_ROUNDS and len(dent) >= REVIEW_ROUNDS and len(ok) >= REVIEW_ROUNDS
        added = {"decision": "corrected", "boxes": [{"status": "added", "class_id": 0, "box_xyxy": [8, 8, 24, 24]}]}
        for n in range(REVIEW_ROUNDS):
            for item, body in ((scratch[n], {"decision": "confirmed"}), (dent[n], {"decision": "false_call"}),
                               (ok[n], added)):  # fmt: skip
                url = f"/v1/inspections/{item['request_id']}/images/{item['image_index']}/review"
                r = client.post(url, json={**body, "reviewer": "live-test"})
                assert r.status_code == 201, r.text
                posted[str(body["decision"])] += 1
            time.sleep(2.5)
    return posted


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if PROMETHEUS is None:
        pytest.skip("prometheus binary not found: install Debian's prometheus package (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("live")
    bundle = make_synthetic_bundle(tmp / "bundle", size=SIZE, max_batch=8)
    service_port, prom_port, central_port = _free_port(), _free_port(), _free_port()
    receiver = _Receiver()
    threading.Thread(target=receiver.serve_forever, name="webhook-receiver", daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AOI_")}
    env.update(AOI_MAX_DELAY_MS="5", AOI_DECODE_WORKERS="2", AOI_INTRA_OP_THREADS="1")
    env.update(AOI_DATA_DIR=str(tmp / "data"), AOI_SIGNALS__WEBHOOK__URL=receiver.url)
    # Plant records on, central away (nothing listens on that port): the forwarder's panels (Plant forwarding row)
    # get their series, the failure path is exercised, and the line must not notice.
    env.update(AOI_STATION_ID="live-test", AOI_LINE_ID="line-live")
    env.update(AOI_CENTRAL__DSN=f"postgresql://aoi_station:unused@127.0.0.1:{central_port}/aoi_central")
    env.update(AOI_CENTRAL__OBJECTS__KIND="dir", AOI_CENTRAL__OBJECTS__ROOT=str(tmp / "share"))  # the image uploader
    service_log, prom_log = tmp / "service.log", tmp / "prometheus.log"
    serve = [sys.executable, "-m", "aoi.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1"]
    serve += ["--port", str(service_port), "--backend", "onnxruntime-cpu", "--log-format", "text"]
    prom = [PROMETHEUS, f"--config.file={_prometheus_config(tmp, service_port)}", f"--storage.tsdb.path={tmp / 'tsdb'}"]
    prom += [f"--web.listen-address=127.0.0.1:{prom_port}"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with service_log.open("wb") as out:
            procs.append(subprocess.Popen(serve, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        with prom_log.open("wb") as out:
            procs.append(subprocess.Popen(prom, cwd=tmp, stdout=out, stderr=subprocess.STDOUT))
        service, prometheus = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{prom_port}"
        _wait_http(f"{service}/readyz", procs[0], service_log, timeout_s=30)
        _wait_http(f"{prometheus}/-/ready", procs[1], prom_log, timeout_s=15)
        # Prometheus applies new scrape targets a few seconds after start: traffic before its first scrape would
        # land between no two samples and rate() would see nothing.
        _eventually(prometheus, {"first scrape": f'up{{job="{JOB}"}} == 1'}, timeout_s=20)
        good, bad = _send_traffic(service)
        _review(service)
        yield Stack(prometheus, service, good, bad, receiver)
    finally:
        for proc in procs:
            _stop(proc)
        receiver.shutdown()
        receiver.server_close()


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5.0)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{promql}: {body.get('error', resp.text)}"
    assert body["data"]["resultType"] == "vector", promql
    return list(body["data"]["result"])


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def _eventually(base: str, queries: dict[str, str], timeout_s: float = 30.0) -> dict[str, list[dict[str, Any]]]:
    """Query until every expression returns at least one finite sample (scrapes and rule evaluations run every 1 s);
    then return the results. Fails naming every query still empty at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        results = {name: _query(base, promql) for name, promql in queries.items()}
        empty = [name for name, result in results.items() if not _has_data(result)]
        if not empty:
            return results
        if time.monotonic() > deadline:
            missing = "\n  ".join(f"{n}: {queries[n]}" for n in empty)
            pytest.fail(f"no data after {timeout_s:.0f} s for:\n  {missing}")
        time.sleep(1.0)


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    queries = {f"{q.panel} [{q.ref_id}]": q.promql() for q in dashboard_queries()}
    assert len(queries) == len(dashboard_queries()), "panel titles and refIds must identify each query"
    results = _eventually(stack.prometheus, queries)
    (info,) = results["Model [A]"]
    assert info["metric"]["name"] == "synthetic" and info["metric"]["backend"] == "onnxruntime-cpu"
    assert {s["metric"]["class_name"] for s in results["Detections per second by class [A]"]} == {"scratch", "dent"}
    assert float(results["Service up [A]"][0]["value"][1]) == 1.0
    assert float(results["Ready [A]"][0]["value"][1]) == 1.0


def test_every_recording_rule_returns_data(stack: Stack) -> None:
    results = _eventually(stack.prometheus, {name: name for name in recording_rules()})
    stages = {s["metric"]["stage"] for s in results["stage:aoi_stage_duration_seconds:p99_1m"] if _has_data([s])}
    assert stages == {"decode", "queue", "inference", "postprocess", "merge"}
    inspect = [s for s in results["route:aoi_request_duration_seconds:p99_1m"] if s["metric"]["route"] == "/v1/inspect"]
    assert inspect and 0.0 < float(inspect[0]["value"][1]) < 5.0


def _wait_value(base: str, promql: str, expected: float, tol: float, timeout_s: float = 10.0) -> float:
    """Poll an expression until it is within ``tol`` of ``expected`` (the last scrape may predate the last request)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = _query(base, promql)
        value = float(result[0]["value"][1]) if result else math.nan
        if abs(value - expected) <= tol or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_counters_match_the_traffic_sent(stack: Stack) -> None:
    """Two thirds of the good frames are NG (red or green patch): the NG share the drift alert compares is right, and
    each kind of bad request moved its own rejection reason."""
    base = stack.prometheus
    answered = stack.good_sent + sum(stack.bad_sent.values())
    scraped = _wait_value(base, "sum(aoi_verdicts_total) + sum(aoi_requests_rejected_total)", answered, 0)
    assert scraped == answered, "Prometheus never scraped counters covering all requests sent"
    assert _wait_value(base, "aoi:ng_ratio:rate30m", 2 / 3, 1e-6) == pytest.approx(2 / 3, abs=1e-6)
    rejected = {s["metric"]["reason"]: float(s["value"][1]) for s in _query(base, "aoi_requests_rejected_total")}
    assert rejected == {**dict.fromkeys(rejected, 0.0), **{r: float(n) for r, n in stack.bad_sent.items()}}
    per_class = {
        s["metric"]["class_name"]: float(s["value"][1])
        for s in _query(base, "class_name:aoi_detections_per_image:rate30m")
    }
    assert set(per_class) == {"scratch", "dent"} and all(v > 0 for v in per_class.values())


def test_records_and_signals_match_the_traffic_sent(stack: Stack) -> None:
    """Every answered frame left one record (durable: before its 200) and one webhook message the receiver
    acknowledged; nothing was lost, dropped or left pending; the NG frames are in the archive."""
    base = stack.prometheus
    assert _wait_value(base, "sum(aoi_records_written_total)", stack.good_sent, 0) == stack.good_sent
    assert _wait_value(base, 'sum(aoi_signals_sent_total{sink="webhook"})', stack.good_sent, 0) == stack.good_sent
    assert stack.webhook.received >= stack.good_sent  # at least once: a retry after a lost answer may repeat one
    for zero in ("sum(aoi_records_lost_total)", "sum(aoi_signals_dropped_total)", "sum(aoi_records_pending)"):
        assert _wait_value(base, zero, 0.0, 0) == 0.0, zero
    assert _wait_value(base, 'sum(aoi_signals_pending{sink="webhook"})', 0.0, 0) == 0.0
    # The NG frames are two distinct images (red and green patch), sent again each round: the same bytes are one file.
    assert _wait_value(base, "sum(aoi_archive_images_total)", 2, 0) == 2
    assert float(_query(base, "sum(aoi_archive_bytes)")[0]["value"][1]) > 0


def test_review_counters_match_the_decisions_posted(stack: Stack) -> None:
    """The decisions the fixture posted (two rounds: a confirmed scratch, a false-called dent, an escape drawn on an
    OK image) are in the review counters Prometheus scraped, and the dent's false-call rate is 1."""
    base = stack.prometheus
    assert _wait_value(base, "sum(aoi_review_decisions_total)", 3 * REVIEW_ROUNDS, 0) == 3 * REVIEW_ROUNDS
    assert _wait_value(base, "sum(aoi_review_escapes_total)", REVIEW_ROUNDS, 0) == REVIEW_ROUNDS
    (called,) = _query(base, 'sum(aoi_review_boxes_total{status="false_call", class_name="dent"})')
    assert float(called["value"][1]) >= REVIEW_ROUNDS  # every dent box of the images called false
    false_calls = 'sum by (class_name) (increase(aoi_review_boxes_total{status="false_call"}[1h]))'
    reviewed = 'sum by (class_name) (increase(aoi_review_boxes_total{status=~"confirmed|false_call|relabelled"}[1h]))'
    rate = _query(base, f"({false_calls} or {reviewed} * 0) / {reviewed}")  # as the dashboard's panel
    assert {s["metric"]["class_name"]: float(s["value"][1]) for s in rate} == {"dent": 1.0, "scratch": 0.0}


def test_an_unreachable_central_database_is_a_backlog(stack: Stack) -> None:
    """Central not answering: every connect fails (counted), nothing is forwarded, every record written is in the
    backlog, its oldest record ages; the line's records and signals are unaffected (the test above)."""
    base = stack.prometheus
    assert _wait_value(base, "min(aoi_forward_connected)", 0.0, 0) == 0.0
    backlog = _wait_value(base, "sum(aoi_forward_backlog_records)", stack.good_sent, 0, timeout_s=30)
    assert backlog == stack.good_sent
    assert _wait_value(base, "sum(aoi_forward_records_total)", 0.0, 0) == 0.0
    assert _wait_value(base, "sum(aoi_forward_batches_total)", 0.0, 0) == 0.0
    connect = _query(base, 'sum(aoi_forward_failures_total{reason="connect"})')
    assert connect and float(connect[0]["value"][1]) >= 1
    oldest = _query(base, "max(aoi_forward_oldest_unforwarded_seconds)")
    assert oldest and float(oldest[0]["value"][1]) > 0


def _query_range(base: str, promql: str, start: float, end: float) -> list[dict[str, Any]]:
    params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1s"}
    body = httpx.get(f"{base}/api/v1/query_range", params=params, timeout=10.0).json()
    assert body["status"] == "success", f"{promql}: {body.get('error')}"
    return list(body["data"]["result"])


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not found: the scaling queries come from the rendered manifests")
def test_the_autoscaling_queries_return_data(stack: Stack) -> None:
    """deploy/k8s scales on in-flight inspection work: the KEDA trigger's query and the prometheus-adapter rule (for
    this pod) return data over the traffic burst, show it as work in flight, and agree (KEDA's total = the sum of the
    adapter's per-pod series); the adapter's series query finds the series with their pod labels."""
    keda = keda_trigger(render_overlay("keda"))["metadata"]["query"]
    rule = adapter_rule(render_overlay("hpa"))
    found = httpx.get(f"{stack.prometheus}/api/v1/series", params={"match[]": rule.series_query}, timeout=5.0)
    series = found.json()["data"]
    assert series and all(POD_TARGET_LABELS.items() <= s.items() for s in series), series
    per_pod = rule.promql(POD_TARGET_LABELS["namespace"], [POD_TARGET_LABELS["pod"]])
    deadline = time.monotonic() + 30
    while True:
        end = time.time()
        total = _query_range(stack.prometheus, keda, end - 300, end)
        pods = _query_range(stack.prometheus, per_pod, end - 300, end)
        if (total and max(float(v) for _, v in total[0]["values"]) > 0) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert len(total) == 1, f"KEDA needs one series: {keda}"
    assert max(float(v) for _, v in total[0]["values"]) > 0, "the burst never showed as requests in flight"
    (pod,) = pods
    assert pod["metric"] == {"pod": POD_TARGET_LABELS["pod"]}, "the adapter maps the series to its pod by this label"
    pod_values = {t: float(v) for t, v in pod["values"]}
    assert pod_values == pytest.approx({t: float(v) for t, v in total[0]["values"]}), "one pod: its value is the total"
