"""service/http/routes/records.py over a small app of its own (the router, the error handlers, the request-id
middleware, a real RecordStore in tmp_path): search, one request, image bytes, the 404s that say why, auth, records
off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.http.errors import install_exception_handlers
from service.http.middleware import RequestContextMiddleware
from service.http.routes.records import records_router
from service.inference.metrics import StageObserver
from service.records.store import RecordStore
from service.settings import ArchiveSettings, RecordsSettings, Settings
from tests.service.records_helpers import PITTED, make_image, make_record

pytestmark = pytest.mark.anyio
JPEG, PNG = make_image(1), make_image(2, "png")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(store: RecordStore | None, admin_keys: tuple[bytes, ...] = ()) -> FastAPI:
    """What service/http/app.py sets up around the router, without the model."""
    app = FastAPI()
    app.state.records = store
    app.state.settings = Settings()
    app.state.api_keys = {"inspect": (), "admin": admin_keys}
    app.include_router(records_router)
    install_exception_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=StageObserver(), routes=frozenset())
    return app


@asynccontextmanager
async def client_for(store: RecordStore | None, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(store, **kw))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RecordStore]:
    s = RecordStore(RecordsSettings(archive=ArchiveSettings(annotated=True)), tmp_path, sweep_interval_s=3600)
    s.start()
    now = time.time()
    await s.add(
        [
            (make_record("r1", JPEG, camera_id="cam-1", received_at=now - 60), JPEG),
            (make_record("r1", PNG, index=1, camera_id="cam-1", detections=[PITTED], received_at=now - 60), PNG),
            (make_record("r2", JPEG, verdict="OK", camera_id="cam-2", received_at=now), JPEG),
        ]
    )
    yield s
    await s.close(5.0)


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message", "request_id"} and body["code"] == code, body
    assert body["request_id"] == r.headers["x-request-id"]
    return str(body["message"])


async def test_search_filters_and_pages(store: RecordStore) -> None:
    async with client_for(store) as client:
        r = await client.get("/v1/inspections")
        assert r.status_code == 200
        page = r.json()
        assert [(d["request_id"], d["image_index"]) for d in page["items"]] == [("r2", 0), ("r1", 1), ("r1", 0)]
        assert page["next_cursor"] is None
        assert page["items"][1]["detections"][0]["class_name"] == "pitted_surface"
        r = await client.get("/v1/inspections", params={"class_name": "pitted_surface"})
        assert [d["image_index"] for d in r.json()["items"]] == [1]
        r = await client.get("/v1/inspections", params={"camera_id": "cam-1", "verdict": "NG", "limit": 1})
        first = r.json()
        assert len(first["items"]) == 1 and first["next_cursor"]
        r = await client.get("/v1/inspections", params={"camera_id": "cam-1", "cursor": first["next_cursor"]})
        assert [d["image_index"] for d in r.json()["items"]] == [0] and r.json()["next_cursor"] is None
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 30))
        r = await client.get("/v1/inspections", params={"since": since})
        assert [d["request_id"] for d in r.json()["items"]] == ["r2"]
        r = await client.get("/v1/inspections", params={"until": str(time.time() - 30)})
        assert {d["request_id"] for d in r.json()["items"]} == {"r1"}


async def test_bad_query_values_are_422_json(store: RecordStore) -> None:
    async with client_for(store) as client:
        message = _error(await client.get("/v1/inspections?since=yesterday"), 422, "invalid_query")
        assert "since" in message and "ISO 8601" in message
        assert "cursor" in _error(await client.get("/v1/inspections?cursor=abc"), 422, "invalid_query")
        _error(await client.get("/v1/inspections?verdict=MAYBE"), 422, "invalid_request")
        _error(await client.get("/v1/inspections?limit=0"), 422, "invalid_request")
        _error(await client.get("/v1/inspections?limit=1001"), 422, "invalid_request")
        _error(await client.get("/v1/inspections?until=nan"), 422, "invalid_query")


async def test_one_request_and_its_images(store: RecordStore) -> None:
    async with client_for(store) as client:
        r = await client.get("/v1/inspections/r1")
        assert r.status_code == 200
        body = r.json()
        assert body["request_id"] == "r1" and [d["image_index"] for d in body["images"]] == [0, 1]
        assert body["images"][0]["image"]["kept"] and body["images"][0]["annotated"]["kept"]
        assert "nobody" in _error(await client.get("/v1/inspections/nobody"), 404, "not_found")
        r = await client.get("/v1/inspections/r1/images/0")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content == JPEG
        r = await client.get("/v1/inspections/r1/images/1")
        assert r.headers["content-type"] == "image/png" and r.content == PNG
        r = await client.get("/v1/inspections/r1/images/1?annotated=true")
        assert r.headers["content-type"] == "image/jpeg" and r.content[:3] == b"\xff\xd8\xff"
        message = _error(await client.get("/v1/inspections/r2/images/0"), 404, "not_found")
        assert "not archived" in message and "ok_sample_rate" in message
        assert "no image 7" in _error(await client.get("/v1/inspections/r1/images/7"), 404, "not_found")
        _error(await client.get("/v1/inspections/r1/images/-1"), 422, "invalid_request")


async def test_an_image_deleted_by_retention_says_when_and_why(tmp_path: Path) -> None:
    old = time.time() - 40 * 86400
    s = RecordStore(RecordsSettings(), tmp_path, sweep_interval_s=0.05)
    s.start()
    try:
        await s.add([(make_record("gone", JPEG, received_at=old), JPEG)])
        async with client_for(s) as client:
            for _ in range(200):
                r = await client.get("/v1/inspections/gone/images/0")
                if r.status_code == 404:
                    break
                await asyncio.sleep(0.02)
            message = _error(r, 404, "not_found")
            assert "deleted by retention (age, records.archive.retention_days)" in message
            assert time.strftime("%Y-%m-%d", time.gmtime()) in message
    finally:
        await s.close(5.0)


async def test_admin_key_and_records_off(store: RecordStore) -> None:
    async with client_for(store, admin_keys=(b"ops",)) as client:
        _error(await client.get("/v1/inspections"), 401, "unauthorized")
        r = await client.get("/v1/inspections", headers={"authorization": "Bearer ops"})
        assert r.status_code == 200
    async with client_for(None) as client:
        for path in ("/v1/inspections", "/v1/inspections/r1", "/v1/inspections/r1/images/0"):
            assert "records.enabled" in _error(await client.get(path), 404, "records_disabled")


def test_openapi_documents_the_routes_and_their_errors() -> None:
    doc = make_app(None).openapi()
    paths = doc["paths"]
    assert set(paths) >= {
        "/v1/inspections",
        "/v1/inspections/{request_id}",
        "/v1/inspections/{request_id}/images/{index}",
    }
    image = paths["/v1/inspections/{request_id}/images/{index}"]["get"]["responses"]
    assert "image/jpeg" in image["200"]["content"] and "404" in image
    listing = paths["/v1/inspections"]["get"]
    assert listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("InspectionPage")
    assert {p["name"] for p in listing["parameters"]} >= {"camera_id", "verdict", "since", "limit", "cursor"}
