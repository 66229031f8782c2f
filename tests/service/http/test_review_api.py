"""service/http/routes/review.py on the whole app (synthetic bundle, FakeBackend, real records in tmp): the queue,
decisions and their 201/404/422, undo and history, the classes and the image; who may review (reviewer and admin
keys, the cookie session with its attributes and its end, loopback only without keys: 401/403); review.enabled off
and records off (404); two reviewers deciding one image at once on a real server (both kept, the later current);
the review metrics after decisions; the queue over 10,000 records through HTTP (a printed figure)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from benchmarks.bench_forward import write_journal
from service.core.bundle import ModelBundle
from service.http.app import create_app
from service.records.schema import DB_NAME
from service.settings import AuthSettings, RecordsSettings, ReviewSettings, Settings
from tests.service.conftest import FakeBackend, uvicorn_thread
from tests.service.records_helpers import SCRATCH, make_record
from tests.synthetic import encode_image

pytestmark = pytest.mark.anyio
KEYS = AuthSettings(reviewer_keys=["rev-key"], admin_keys=["adm-key"], inspect_keys=["cam-key"])  # type: ignore[list-item]
REVIEWER = {"authorization": "Bearer rev-key"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _frame(channel: int | None) -> bytes:
    """64 x 64: black (OK), or a saturated patch in ``channel`` (the synthetic model's class ``channel``: NG)."""
    img = np.zeros((64, 64, 3), np.uint8)
    if channel is not None:
        img[16:48, 16:48, channel] = 255
    return encode_image(img, "png")


@asynccontextmanager
async def app_client(
    bundle: ModelBundle, client: tuple[str, int] = ("127.0.0.1", 50000), base: str = "http://test", **kw: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(max_delay_ms=0, **kw), bundle=bundle, backend=FakeBackend(bundle))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url=base) as c:
            yield c


async def _inspect(client: httpx.AsyncClient, rid: str, channel: int | None, camera: str = "cam-1", **h: str) -> None:
    r = await client.post(f"/v1/inspect?camera_id={camera}", content=_frame(channel),
                          headers={"content-type": "image/png", "x-request-id": rid, **h})  # fmt: skip
    assert r.status_code == 200, r.text


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message", "request_id"} and body["code"] == code, body
    return str(body["message"])


async def test_decide_undo_history_queue_and_classes(bundle: ModelBundle) -> None:
    async with app_client(bundle) as client:  # no keys: loopback callers review as "local"
        for rid, channel in (("ng-1", 0), ("ng-2", 1), ("ok-1", None)):
            await _inspect(client, rid, channel)
        queue = (await client.get("/v1/review/queue")).json()
        assert [i["request_id"] for i in queue["items"]] == ["ng-2", "ng-1"] and queue["total_unreviewed"] == 2
        item = queue["items"][1]
        assert item["image_url"] == "/v1/inspections/ng-1/images/0/image" and item["image_kept"] is True
        assert item["review"] is None and item["detections"][0]["class_name"] == "scratch" and item["verdict"] == "NG"
        image = await client.get(item["image_url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        classes = (await client.get("/v1/review/classes")).json()
        assert classes["classes"] == [{"class_id": 0, "class_name": "scratch"}, {"class_id": 1, "class_name": "dent"}]

        r = await client.post("/v1/inspections/ng-1/images/0/review", json={"decision": "confirmed"})
        assert r.status_code == 201, r.text
        first = r.json()
        assert set(first) >= {"review_seq", "decision", "boxes", "reviewer", "decided_at", "model_version"}
        assert first["reviewer"] == "local" and first["model_version"] == bundle.version
        assert first["boxes"][0]["status"] == "confirmed" and first["boxes"][0]["detection_ordinal"] == 0
        n = len(item["detections"])
        corrected = {
            "decision": "corrected", "reviewer": "ana",
            "boxes": [{"status": "relabelled", "detection_ordinal": 0, "class_id": 1},
                      *({"status": "false_call", "detection_ordinal": i} for i in range(1, n)),
                      {"status": "added", "class_id": 0, "box_xyxy": [0, 0, 10, 10]}],
        }  # fmt: skip
        r = await client.post("/v1/inspections/ng-1/images/0/review", json=corrected)
        assert r.status_code == 201 and r.json()["reviewer"] == "ana", r.text
        assert r.json()["boxes"][0]["status"] == "relabelled"
        assert r.json()["boxes"][0]["original_class_id"] == 0 and r.json()["boxes"][-1]["score"] is None

        reviewed = (await client.get("/v1/review/queue?status=reviewed")).json()
        assert [i["request_id"] for i in reviewed["items"]] == ["ng-1"]
        assert reviewed["items"][0]["review"]["decision"] == "corrected" and reviewed["total_unreviewed"] == 1
        everything = (await client.get("/v1/review/queue?status=all&verdict=any&limit=1")).json()
        assert len(everything["items"]) == 1 and everything["next_before_seq"] is not None
        rest = await client.get(f"/v1/review/queue?status=all&verdict=any&before_seq={everything['next_before_seq']}")
        assert [i["request_id"] for i in rest.json()["items"]] == ["ng-2", "ng-1"]

        r = await client.delete("/v1/inspections/ng-1/images/0/review")
        assert r.status_code == 200 and r.json()["review_seq"] == first["review_seq"]
        r = await client.delete("/v1/inspections/ng-1/images/0/review", params={"reviewer": "bo"})
        assert r.status_code == 200 and r.json() is None
        _error(await client.delete("/v1/inspections/ng-1/images/0/review"), 404, "not_found")
        history = (await client.get("/v1/inspections/ng-1/images/0/reviews")).json()
        assert [(h["decision"], h["reviewer"]) for h in history["reviews"]] == [
            ("undo", "bo"), ("undo", "local"), ("corrected", "ana"), ("confirmed", "local"),
        ]  # fmt: skip
        assert history["reviews"][0]["undoes"] == first["review_seq"]
        assert (await client.get("/v1/review/queue")).json()["total_unreviewed"] == 2


async def test_unknown_records_and_inconsistent_bodies(bundle: ModelBundle) -> None:
    async with app_client(bundle) as client:
        await _inspect(client, "ng", 0)
        await _inspect(client, "ok", None)
        for method, path in (("POST", "review"), ("DELETE", "review"), ("GET", "reviews"), ("GET", "image")):
            r = await client.request(method, f"/v1/inspections/nope/images/0/{path}", json={"decision": "confirmed"})
            _error(r, 404, "not_found")
        base = "/v1/inspections/ng/images/0/review"
        bad = [
            {"decision": "corrected", "boxes": [{"status": "confirmed", "detection_ordinal": 99}]},
            {"decision": "corrected", "boxes": [{"status": "relabelled", "detection_ordinal": 0, "class_id": 7}]},
            {"decision": "corrected", "boxes": [{"status": "added", "class_id": 0, "box_xyxy": [0, 0, 65, 9]}]},
            {"decision": "confirmed", "boxes": [{"status": "confirmed", "detection_ordinal": 0}]},
        ]
        for body in bad:
            _error(await client.post(base, json=body), 422, "invalid_review")
        _error(await client.post("/v1/inspections/ok/images/0/review", json={"decision": "false_call"}), 422,
               "invalid_review")  # fmt: skip
        for body in ({"decision": "maybe"}, {"decision": "confirmed", "colour": "red"}, {"boxes": []}):
            assert (await client.post(base, json=body)).status_code == 422
        assert (await client.get("/v1/review/queue?limit=501")).status_code == 422
        _error(await client.get("/v1/review/queue?since=yesterday"), 422, "invalid_query")
        assert (await client.get("/v1/inspections/ok/images/0/image")).status_code == 404  # OK: not archived
        assert (await client.get("/v1/inspections/ng/images/0/reviews")).json()["reviews"] == []


async def test_keys_and_loopback(bundle: ModelBundle) -> None:
    async with app_client(bundle, auth=KEYS, client=("10.1.2.3", 4000)) as client:
        await _inspect(client, "ng", 0, authorization="Bearer cam-key")
        for headers in ({}, {"authorization": "Bearer cam-key"}, {"x-api-key": "guess"}):
            r = await client.get("/v1/review/queue", headers=headers)
            assert "guess" not in _error(r, 401, "unauthorized")
        for headers in (REVIEWER, {"authorization": "Bearer adm-key"}, {"x-api-key": "rev-key"}):
            assert (await client.get("/v1/review/queue", headers=headers)).status_code == 200
        r = await client.post("/v1/inspections/ng/images/0/review", json={"decision": "skipped"}, headers=REVIEWER)
        assert r.status_code == 201 and r.json()["reviewer"].startswith("key-") and "rev" not in r.json()["reviewer"]
    async with app_client(bundle, client=("10.1.2.3", 4000)) as client:  # no keys: loopback only
        assert "loopback" in _error(await client.get("/v1/review/queue"), 403, "forbidden")
        _error(await client.post("/review/session", json={"reviewer": "ana"}), 403, "forbidden")
    async with app_client(bundle) as client:
        r = await client.get("/v1/review/queue", headers={"x-forwarded-for": "10.9.9.9"})
        _error(r, 403, "forbidden")  # relayed by a proxy: not a local caller
        assert (await client.get("/v1/review/queue")).status_code == 200


async def test_cookie_session(bundle: ModelBundle) -> None:
    async with app_client(bundle, auth=KEYS) as client:
        await _inspect(client, "ng", 0, authorization="Bearer cam-key")
        _error(await client.post("/review/session", json={"key": "cam-key", "reviewer": "ana"}), 401, "unauthorized")
        assert (await client.post("/review/session", json={"key": "rev-key", "reviewer": "a\nb"})).status_code == 422
        r = await client.post("/review/session", json={"key": "rev-key", "reviewer": "ana"})
        assert r.status_code == 204 and not r.content
        cookie = r.headers["set-cookie"]
        attributes = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")}
        token = attributes["aoi_review"].split("=", 1)[1]
        assert len(token) >= 40 and "httponly" in attributes and "secure" not in attributes
        assert attributes["samesite"].lower() == "samesite=strict" and attributes["path"] == "Path=/"
        assert int(attributes["max-age"].split("=")[1]) == 12 * 3600
        assert (await client.get("/v1/review/queue")).status_code == 200  # the cookie jar sends it
        assert (await client.get("/v1/inspections/ng/images/0/image")).status_code == 200
        r = await client.post("/v1/inspections/ng/images/0/review", json={"decision": "confirmed", "reviewer": "eve"})
        assert r.status_code == 201 and r.json()["reviewer"] == "ana"  # a session's name is not the body's to change
        r = await client.delete("/review/session")
        assert r.status_code == 204 and "max-age=0" in r.headers["set-cookie"].lower()
        client.cookies.set("aoi_review", token)  # the old token, sent again: its session has ended
        assert "ended" in _error(await client.get("/v1/review/queue"), 401, "unauthorized")
        client.cookies.set("aoi_review", "forged")
        _error(await client.get("/v1/review/queue"), 401, "unauthorized")
        assert (await client.get("/v1/inspections", headers={"cookie": f"aoi_review={token}"})).status_code == 401
    async with app_client(bundle, auth=KEYS, base="https://test") as client:
        r = await client.post("/review/session", json={"key": "adm-key", "reviewer": "ana"})
        assert r.status_code == 204 and "secure" in r.headers["set-cookie"].lower()


async def test_a_session_ends_after_its_ttl(bundle: ModelBundle) -> None:
    async with app_client(bundle, auth=KEYS, review=ReviewSettings(session_ttl_s=0.3)) as client:
        assert (await client.post("/review/session", json={"key": "rev-key", "reviewer": "ana"})).status_code == 204
        assert (await client.get("/v1/review/queue")).status_code == 200
        await asyncio.sleep(0.4)
        _error(await client.get("/v1/review/queue"), 401, "unauthorized")


async def test_review_off_and_records_off_are_404(bundle: ModelBundle) -> None:
    calls = [("GET", "/v1/review/queue"), ("GET", "/v1/review/classes"), ("POST", "/review/session"),
             ("DELETE", "/review/session"), ("POST", "/v1/inspections/x/images/0/review"),
             ("GET", "/v1/inspections/x/images/0/reviews"), ("GET", "/v1/inspections/x/images/0/image")]  # fmt: skip
    body = {"decision": "confirmed", "reviewer": "ana", "key": ""}
    async with app_client(bundle, review=ReviewSettings(enabled=False)) as client:
        for method, path in calls:
            r = await client.request(method, path, json=body if method == "POST" else None)
            _error(r, 404, "review_disabled")
    async with app_client(bundle, records=RecordsSettings(enabled=False)) as client:
        for method, path in calls[:1] + calls[4:]:
            _error(await client.request(method, path, json=body if method == "POST" else None), 404, "records_disabled")


async def test_review_metrics_after_decisions(bundle: ModelBundle) -> None:
    async with app_client(bundle) as client:
        await _inspect(client, "a", 0, camera="cam-7")
        await _inspect(client, "b", 1, camera="cam-7")
        await _inspect(client, "c", None, camera="cam-8")
        await client.post("/v1/inspections/a/images/0/review", json={"decision": "confirmed"})
        await client.post("/v1/inspections/b/images/0/review", json={"decision": "false_call"})
        await client.delete("/v1/inspections/b/images/0/review")
        add = {"decision": "corrected", "boxes": [{"status": "added", "class_id": 1, "box_xyxy": [1, 1, 5, 5]}]}
        assert (await client.post("/v1/inspections/c/images/0/review", json=add)).status_code == 201
        text = (await client.get("/metrics")).text
    a_boxes = 'aoi_review_boxes_total{camera_id="cam-7",class_name="scratch",status="confirmed"}'
    for line in (
        'aoi_review_decisions_total{camera_id="cam-7",decision="confirmed"} 1.0',
        'aoi_review_decisions_total{camera_id="cam-7",decision="false_call"} 1.0',
        'aoi_review_decisions_total{camera_id="cam-7",decision="undo"} 1.0',
        'aoi_review_decisions_total{camera_id="cam-8",decision="corrected"} 1.0',
        'aoi_review_boxes_total{camera_id="cam-8",class_name="dent",status="added"} 1.0',
        'aoi_review_escapes_total{camera_id="cam-8",class_name="dent"} 1.0',
    ):
        assert line in text, line
    assert f"{a_boxes} " in text
    assert 'aoi_review_boxes_total{camera_id="cam-7",class_name="dent",status="false_call"}' in text


def test_two_reviewers_at_once_on_a_real_server(bundle: ModelBundle) -> None:
    """Concurrent decisions on one image over real sockets: every one is recorded once, the history orders them by
    commit, the current decision is the last committed, and the queue agrees."""
    app = create_app(Settings(max_delay_ms=0, auth=KEYS), bundle=bundle, backend=FakeBackend(bundle))
    with uvicorn_thread(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        r = client.post("/v1/inspect", content=_frame(0), headers={"content-type": "image/png", "x-request-id": "x",
                                                                  "authorization": "Bearer cam-key"})  # fmt: skip
        assert r.status_code == 200
        url = "/v1/inspections/x/images/0/review"

        def post(i: int) -> dict[str, Any]:
            body = {"decision": "confirmed" if i % 2 else "false_call", "reviewer": f"r{i % 2}"}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as own:
                resp = own.post(url, json=body, headers=REVIEWER)
            assert resp.status_code == 201, resp.text
            return dict(resp.json())

        with ThreadPoolExecutor(max_workers=8) as pool:
            made = list(pool.map(post, range(40)))
        seqs = sorted(d["review_seq"] for d in made)
        assert len(set(seqs)) == 40
        history = client.get("/v1/inspections/x/images/0/reviews", headers=REVIEWER).json()["reviews"]
        assert [h["review_seq"] for h in history] == seqs[::-1]
        last = next(d for d in made if d["review_seq"] == seqs[-1])
        (item,) = client.get("/v1/review/queue?status=reviewed", headers=REVIEWER).json()["items"]
        assert item["review"]["review_seq"] == last["review_seq"] and item["review"]["decision"] == last["decision"]
        undone = client.delete(url, headers=REVIEWER).json()
        assert undone["review_seq"] == seqs[-2]


async def test_queue_over_10000_records_through_http(bundle: ModelBundle, tmp_path: Path) -> None:
    data = tmp_path / "big"
    records = [
        make_record(f"b{i}", f"b{i}".encode(), verdict="NG" if i % 3 == 0 else "OK", camera_id=f"cam-{i % 4}",
                    detections=[SCRATCH] if i % 3 == 0 else [], received_at=time.time() - 10_000 + i)
        for i in range(10_000)
    ]  # fmt: skip
    write_journal(data, records, archive_ng=True)
    assert (data / DB_NAME).is_file()
    async with app_client(bundle, data_dir=data) as client:
        timings = []
        assert (await client.get("/v1/review/queue?limit=1")).status_code == 200  # the reader's connection opened
        for query in ("", "?camera_id=cam-1", "?class_name=scratches", "?status=all&verdict=any"):
            start = time.perf_counter()
            r = await client.get(f"/v1/review/queue{query}")
            timings.append((query or "(default: NG, unreviewed)", (time.perf_counter() - start) * 1000))
            assert r.status_code == 200 and len(r.json()["items"]) == 100
    print("\nGET /v1/review/queue over 10,000 records (in-process, 100 items):")
    for query, ms in timings:
        print(f"  {ms:7.1f} ms  {query}")
