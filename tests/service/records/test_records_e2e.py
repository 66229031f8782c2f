"""Records and signals through the whole service: what POST /v1/inspect answered is what the record says, the
archived image is the uploaded one, the version that answered is in both, and the line hears the verdict over a
real MQTT broker (mosquitto)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from service.http.app import create_app
from service.records.schema import DB_NAME
from service.settings import MqttSettings, RecordsSettings, Settings, SignalsSettings
from tests.service.conftest import serve
from tests.service.records.test_store import _fill_database as fill_database
from tests.service.signals.test_signals import MOSQUITTO, Broker, Subscriber
from tests.synthetic import make_image_bytes, make_synthetic_bundle

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def line(tmp_path: Path) -> Iterator[tuple[Broker, Subscriber]]:
    """A real mosquitto and a QoS 1 subscriber of aoi/verdicts/# (the PLC side)."""
    root = tmp_path / "broker"
    root.mkdir()
    broker = Broker(root)
    broker.start()
    sub = Subscriber(broker.port)
    yield broker, sub
    sub.close()
    broker.stop()


@pytest.fixture(scope="module")
def ng_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every cell of a textured image scores over 0.05: every verdict NG. Above 0.95 nothing does: OK."""
    return make_synthetic_bundle(tmp_path_factory.mktemp("ng"), threshold=0.05)


def _settings(bundle: Path, data: Path, **kw: Any) -> Settings:
    return Settings(bundle=bundle, backend="onnxruntime-cpu", max_delay_ms=0, data_dir=data, **kw)


async def test_every_answer_is_recorded_with_its_image_and_version(ng_bundle: Path, tmp_path: Path) -> None:
    image = make_image_bytes(64, 64, "png", seed=1)
    async with serve(_settings(ng_bundle, tmp_path / "data")) as client:
        r = await client.post("/v1/inspect?camera_id=cam-7&part_id=A1234", content=image,
                              headers={**PNG, "x-request-id": "rid-1"})  # fmt: skip
        assert r.status_code == 200
        answer = r.json()
        assert answer["verdict"] == "NG"
        model = (await client.get("/v1/model")).json()
        got = await client.get("/v1/inspections/rid-1")
        assert got.status_code == 200, got.text
        (record,) = got.json()["images"]
        assert record["verdict"] == "NG" and record["camera_id"] == "cam-7" and record["part_id"] == "A1234"
        assert record["model_version"] == answer["model_version"] and record["model_hash"] == model["bundle_hash"]
        assert record["detections"] == answer["detections"]
        assert record["image_sha256"] == hashlib.sha256(image).hexdigest() and record["image_bytes"] == len(image)
        kept = await client.get("/v1/inspections/rid-1/images/0")
        assert kept.status_code == 200 and kept.content == image and kept.headers["content-type"] == "image/png"
        listed = (await client.get("/v1/inspections?verdict=NG&camera_id=cam-7&part_id=A1234")).json()
        assert [i["request_id"] for i in listed["items"]] == ["rid-1"]

        # A multipart request: one record per image, in part order.
        files = [("images", (f"p{i}.png", make_image_bytes(64, 64, "png", seed=10 + i), "image/png")) for i in range(3)]
        r = await client.post("/v1/inspect", files=files, headers={"x-request-id": "rid-multi"})
        assert r.status_code == 200
        images = (await client.get("/v1/inspections/rid-multi")).json()["images"]
        assert [(i["image_index"], i["filename"]) for i in images] == [(0, "p0.png"), (1, "p1.png"), (2, "p2.png")]
        metrics = (await client.get("/metrics")).text
        assert "aoi_records_written_total 4.0" in metrics
    assert (tmp_path / "data" / DB_NAME).is_file()


async def test_ok_images_are_not_kept_unless_sampled(tmp_path: Path) -> None:
    bundle = make_synthetic_bundle(tmp_path / "ok", threshold=0.95)
    image = make_image_bytes(64, 64, "png", seed=2)
    async with serve(_settings(bundle, tmp_path / "data")) as client:
        r = await client.post("/v1/inspect", content=image, headers={**PNG, "x-request-id": "ok-1"})
        assert r.json()["verdict"] == "OK"
        (record,) = (await client.get("/v1/inspections/ok-1")).json()["images"]
        assert record["verdict"] == "OK" and record["image"]["kept"] is False
        missing = await client.get("/v1/inspections/ok-1/images/0")
        assert missing.status_code == 404 and "not" in missing.json()["message"]


async def test_records_disabled_keep_nothing(ng_bundle: Path, tmp_path: Path) -> None:
    settings = _settings(ng_bundle, tmp_path / "data", records=RecordsSettings(enabled=False))
    async with serve(settings) as client:
        r = await client.post(
            "/v1/inspect", content=make_image_bytes(64, 64, "png"), headers={**PNG, "x-request-id": "x"}
        )
        assert r.status_code == 200
        off = await client.get("/v1/inspections/x")
        assert off.status_code == 404 and off.json()["code"] == "records_disabled"
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("on_failure", ["refuse", "serve"])
async def test_a_full_disk_is_a_503_or_a_counted_loss_never_silent(
    ng_bundle: Path, tmp_path: Path, on_failure: str
) -> None:
    """The records database fills up (a genuine SQLITE_FULL: its size capped, as on a full disk). ``refuse``: the
    answer is withheld (503 records_unavailable); ``serve``: answered, and every lost record counted."""
    settings = _settings(ng_bundle, tmp_path / "data", records=RecordsSettings(on_failure=on_failure))  # type: ignore[arg-type]
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            fill_database(app.state.records)
            statuses = []
            for i in range(30):
                r = await client.post("/v1/inspect", content=make_image_bytes(64, 64, "png", seed=100 + i), headers=PNG)
                statuses.append(r.status_code)
                if r.status_code != 200:
                    assert r.status_code == 503 and r.json()["code"] == "records_unavailable", r.text
                    assert "records.on_failure" in r.json()["message"]
            metrics = (await client.get("/metrics")).text
    lost = [line for line in metrics.splitlines() if line.startswith('aoi_records_lost_total{reason="disk_full"}')]
    assert lost and float(lost[0].split()[-1]) > 0, lost
    if on_failure == "refuse":
        assert 503 in statuses
    else:
        assert set(statuses) == {200}


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto not installed (apt-get install mosquitto)")
async def test_verdicts_reach_the_line_over_mqtt(
    ng_bundle: Path, tmp_path: Path, line: tuple[Broker, Subscriber]
) -> None:
    broker, subscriber = line
    mqtt = MqttSettings(host="127.0.0.1", port=broker.port, client_id="aoi-e2e")
    settings = _settings(ng_bundle, tmp_path / "data", signals=SignalsSettings(mqtt=mqtt))
    async with serve(settings) as client:
        answers = []
        for i in range(5):
            image = make_image_bytes(64, 64, "png", seed=i)
            headers = {**PNG, "x-request-id": f"mq-{i}"}
            r = await client.post(f"/v1/inspect?camera_id=line-{i % 2}", content=image, headers=headers)
            answers.append(r.json())
        for _ in range(200):
            if len(subscriber.received()) >= 5:
                break
            await asyncio.sleep(0.05)
    got = {m["request_id"]: (topic, m) for topic, m in subscriber.received()}
    assert set(got) == {f"mq-{i}" for i in range(5)}
    for i, a in enumerate(answers):
        topic, m = got[f"mq-{i}"]
        assert topic == f"aoi/verdicts/line-{i % 2}"
        assert m["verdict"] == a["verdict"] == "NG" and m["model_version"] == a["model_version"]
        assert len(m["detections"]) == len(a["detections"]) and sum(m["counts"].values()) == len(a["detections"])
