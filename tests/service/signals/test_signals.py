"""Verdict signals against real receivers: a mosquitto broker started per test and a local HTTP server in a thread.
Delivery is checked by polling with a generous timeout, never by timing."""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry

from service.settings import MqttSettings, SignalsSettings, WebhookSettings
from service.signals.hub import OUTBOX_FILE, Signals
from service.signals.mqtt import topic_for
from service.signals.sink import backoff_s
from service.signals.webhook import is_retryable

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None  # Debian installs it outside PATH
)
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None, reason="mosquitto is not installed (apt-get install mosquitto; .ci/run does it as root)"
)
TIMEOUT_S = 15.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _message(
    i: int, verdict: str = "NG", camera_id: str | None = "cam-1", part_id: str | None = None
) -> dict[str, Any]:
    return {
        "request_id": f"req-{i}",
        "image_index": 0,
        "time": "2026-01-02T03:04:05.678Z",
        "camera_id": camera_id,
        "part_id": part_id or f"part-{i}",
        "verdict": verdict,
        "model_name": "yolo11s.neu-det",
        "model_version": "1.4.0",
        "detections": [{"class_name": "scratch", "score": 0.9, "box_xyxy": [1.0, 2.0, 30.0, 40.0]}]
        if verdict == "NG"
        else [],
        "counts": {"scratch": 1} if verdict == "NG" else {},
    }


async def _until(predicate: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- MQTT


class Broker:
    """A mosquitto on a fixed port that can be stopped and started again; it persists sessions, so a subscriber's
    QoS 1 subscription and queued messages outlive a restart. It also queues QoS 0 messages for that offline
    subscriber (``queue_qos0_messages``): after a restart the service may reconnect and drain its outbox before the
    test's subscriber is back, and the outage tests check the service's outbox, not the broker's QoS 0 policy."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.root = root
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\nqueue_qos0_messages true\n"
            f"persistence_location {root}/\nlog_dest file {root}/mosquitto.log\nuser {getpass.getuser()}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / "mosquitto.log").read_text() if (self.root / "mosquitto.log").exists() else ""
                    raise RuntimeError(f"mosquitto did not start: {log[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto writes its persistence file
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    root = tmp_path / "broker"
    root.mkdir()
    b = Broker(root)
    b.start()
    yield b
    b.stop()


class Subscriber:
    """A QoS 1 subscriber of ``aoi/verdicts/#`` with a persistent session (it reconnects after a broker restart)."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{port}", clean_session=False)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("aoi/verdicts/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the test subscriber did not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def received(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(broker: Broker) -> Iterator[Subscriber]:
    sub = Subscriber(broker.port)
    yield sub
    sub.close()


def _mqtt_signals(port: int, data_dir: Path, **mqtt: Any) -> Signals:
    settings = SignalsSettings(mqtt=MqttSettings(host="127.0.0.1", port=port, client_id=f"aoi-{port}", **mqtt))
    return Signals(settings, data_dir, CollectorRegistry())


def test_topic_sanitises_the_camera_id() -> None:
    assert topic_for("aoi/verdicts", "cam-1") == "aoi/verdicts/cam-1"
    assert topic_for("aoi/verdicts/", "line/2+#") == "aoi/verdicts/line_2__"
    assert topic_for("aoi/verdicts", None) == "aoi/verdicts/none"
    assert topic_for("aoi/verdicts", "") == "aoi/verdicts/none"


@needs_mosquitto
@pytest.mark.anyio
@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_mqtt_delivers_every_verdict(broker: Broker, subscriber: Subscriber, tmp_path: Path, qos: int) -> None:
    signals = _mqtt_signals(broker.port, tmp_path / "data", qos=qos)
    signals.start()
    cameras = ["cam-1", "line/2", None]
    messages = [_message(i, "NG" if i % 2 else "OK", camera_id=cameras[i % 3]) for i in range(30)]
    await signals.publish(messages[:10], durable=True)
    for m in messages[10:]:
        await signals.publish([m], durable=False)
    await _until(lambda: len(subscriber.received()) >= 30, "30 verdicts on the broker")
    got = subscriber.received()
    topics = {"cam-1": "aoi/verdicts/cam-1", "line/2": "aoi/verdicts/line_2", None: "aoi/verdicts/none"}
    assert sorted((t, m["request_id"]) for t, m in got) == sorted(
        (topics[m["camera_id"]], m["request_id"]) for m in messages
    )
    by_id = {m["request_id"]: m for _, m in got}
    assert all(by_id[m["request_id"]] == m for m in messages)  # payload unchanged
    await _until(lambda: signals.pending("mqtt") == 0, "outbox empty")
    r = signals.metrics.registry
    assert _sample(r, "aoi_signals_sent_total", sink="mqtt") == 30
    assert _sample(r, "aoi_signals_pending", sink="mqtt") == 0
    assert _sample(r, "aoi_signal_delivery_seconds_count", sink="mqtt") == 30
    await signals.close(5.0)


@needs_mosquitto
@pytest.mark.anyio
async def test_mqtt_only_ng(broker: Broker, subscriber: Subscriber, tmp_path: Path) -> None:
    signals = _mqtt_signals(broker.port, tmp_path / "data", only_ng=True)
    signals.start()
    await signals.publish([_message(i, "NG" if i in (1, 4) else "OK") for i in range(6)], durable=True)
    await _until(lambda: signals.pending("mqtt") == 0, "outbox empty")
    await signals.close(5.0)
    await _until(lambda: len(subscriber.received()) >= 2, "the NG verdicts")
    await asyncio.sleep(0.2)  # an OK verdict wrongly sent would have arrived by now
    assert [m["request_id"] for _, m in subscriber.received()] == ["req-1", "req-4"]


@needs_mosquitto
@pytest.mark.anyio
@pytest.mark.parametrize("qos", [0, 1])
async def test_mqtt_broker_outage_then_everything_delivered(
    broker: Broker, subscriber: Subscriber, tmp_path: Path, qos: int
) -> None:
    signals = _mqtt_signals(broker.port, tmp_path / "data", qos=qos)
    signals.start()
    await signals.publish([_message(i) for i in range(3)], durable=True)
    await _until(lambda: len(subscriber.received()) == 3, "the first verdicts")

    broker.stop()
    for i in range(3, 13):
        await signals.publish([_message(i)], durable=False)  # keeps accepting with the broker away
    r = signals.metrics.registry
    await _until(lambda: _sample(r, "aoi_signals_pending", sink="mqtt") == 10, "10 verdicts waiting in the outbox")
    with sqlite3.connect(tmp_path / "data" / OUTBOX_FILE) as conn:
        assert conn.execute("SELECT COUNT(*) FROM outbox WHERE sink = 'mqtt'").fetchone() == (10,)

    broker.start()  # same port
    await _until(lambda: len({m["request_id"] for _, m in subscriber.received()}) == 13, "every verdict after it")
    await _until(lambda: signals.pending("mqtt") == 0, "outbox empty")
    assert _sample(r, "aoi_signals_sent_total", sink="mqtt") >= 13
    await signals.close(5.0)


@needs_mosquitto
@pytest.mark.anyio
async def test_mqtt_outbox_survives_a_restart(broker: Broker, subscriber: Subscriber, tmp_path: Path) -> None:
    broker.stop()
    first = _mqtt_signals(broker.port, tmp_path / "data")
    first.start()
    messages = [_message(i, camera_id="cam-9") for i in range(5)]
    await first.publish(messages, durable=True)
    await first.close(0.3)  # the broker is away: the verdicts stay in the outbox
    assert first.pending("mqtt") == 5

    broker.start()
    second = _mqtt_signals(broker.port, tmp_path / "data")
    second.start()
    assert second.pending("mqtt") == 5
    await _until(lambda: len(subscriber.received()) >= 5, "the verdicts of the earlier run")
    assert [m for _, m in subscriber.received()] == messages
    await _until(lambda: second.pending("mqtt") == 0, "outbox empty")
    await second.close(5.0)


# ---------------------------------------------------------------- webhook


class Receiver:
    """A local HTTP server in a thread: records each request and answers ``status(body)`` (200 by default)."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        self.status: Callable[[dict[str, Any]], int] = lambda body: 200
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = receiver.status(body)
                with receiver._lock:
                    receiver.requests.append((status, dict(self.headers), body))
                reply = b'{"error": "part_id unknown"}' if status == 400 else b"{}"
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/verdicts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def seen(self) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
        with self._lock:
            return list(self.requests)

    def delivered(self) -> list[dict[str, Any]]:
        return [body for status, _, body in self.seen() if status == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _webhook_signals(url: str, data_dir: Path, outbox_max: int = 1000, **webhook: Any) -> Signals:
    hook = WebhookSettings(url=url, max_backoff_ms=50.0, timeout_ms=2000.0, **webhook)
    return Signals(SignalsSettings(webhook=hook, outbox_max=outbox_max), data_dir, CollectorRegistry())


def test_retry_classification_and_backoff() -> None:
    import random

    assert [s for s in (200, 301, 400, 404, 408, 409, 422, 429, 500, 502, 503) if is_retryable(s)] == [
        408,
        429,
        500,
        502,
        503,
    ]
    rng = random.Random(0)
    waits = [backoff_s(a, 30.0, rng) for a in range(12)]
    assert all(0.1 <= w <= 30.0 for w in waits)
    assert max(waits[-3:]) >= 15.0  # capped, and jitter never takes it below half the cap


@pytest.mark.anyio
async def test_webhook_retries_keep_order(receiver: Receiver, tmp_path: Path) -> None:
    failures = iter(range(3))
    receiver.status = lambda body: 503 if next(failures, None) is not None else 200
    signals = _webhook_signals(receiver.url, tmp_path / "data", headers={"Authorization": "Bearer t0ken"})
    signals.start()
    messages = [_message(i, "OK" if i % 3 else "NG") for i in range(6)]
    for m in messages:
        await signals.publish([m], durable=False)
    await _until(lambda: len(receiver.delivered()) == 6, "6 verdicts delivered")
    assert receiver.delivered() == messages  # in publishing order, despite the retries
    seen = receiver.seen()
    assert [status for status, _, _ in seen] == [503, 503, 503] + [200] * 6
    keys = [headers["Idempotency-Key"] for _, headers, _ in seen]
    assert keys[:4] == [keys[0]] * 4  # a retry carries the same id
    assert len(set(keys[3:])) == 6
    assert all(h["X-AOI-Message-Id"] == h["Idempotency-Key"] for _, h, _ in seen)
    assert all(h["Authorization"] == "Bearer t0ken" and h["Content-Type"] == "application/json" for _, h, _ in seen)
    r = signals.metrics.registry
    await _until(lambda: signals.pending("webhook") == 0, "outbox empty")
    assert _sample(r, "aoi_signals_failed_total", sink="webhook") == 3
    assert _sample(r, "aoi_signals_sent_total", sink="webhook") == 6
    await signals.close(5.0)


@pytest.mark.anyio
async def test_webhook_permanent_failure_is_dropped(receiver: Receiver, tmp_path: Path) -> None:
    receiver.status = lambda body: 400 if body["part_id"] == "bad" else 200
    signals = _webhook_signals(receiver.url, tmp_path / "data")
    signals.start()
    messages = [_message(0), _message(1, part_id="bad"), _message(2)]
    await signals.publish(messages, durable=True)
    await _until(lambda: len(receiver.seen()) == 3 and signals.pending("webhook") == 0, "three attempts")
    assert receiver.delivered() == [messages[0], messages[2]]
    r = signals.metrics.registry
    assert _sample(r, "aoi_signals_dropped_total", sink="webhook", reason="rejected") == 1
    assert _sample(r, "aoi_signals_sent_total", sink="webhook") == 2
    await signals.close(5.0)


@pytest.mark.anyio
async def test_outbox_bound_drops_the_oldest(receiver: Receiver, tmp_path: Path) -> None:
    up = threading.Event()
    receiver.status = lambda body: 200 if up.is_set() else 503
    signals = _webhook_signals(receiver.url, tmp_path / "data", outbox_max=5)
    signals.start()
    messages = [_message(i) for i in range(20)]
    await signals.publish(messages, durable=True)
    r = signals.metrics.registry
    assert _sample(r, "aoi_signals_dropped_total", sink="webhook", reason="outbox_full") == 15
    assert _sample(r, "aoi_signals_pending", sink="webhook") == 5
    with sqlite3.connect(tmp_path / "data" / OUTBOX_FILE) as conn:
        kept = [json.loads(p) for (p,) in conn.execute("SELECT payload FROM outbox ORDER BY id")]
    assert kept == messages[15:]
    up.set()
    await _until(lambda: signals.pending("webhook") == 0, "outbox empty")
    assert receiver.delivered() == messages[15:]
    await signals.close(5.0)


@pytest.mark.anyio
async def test_durable_publish_is_on_disk_when_it_returns(receiver: Receiver, tmp_path: Path) -> None:
    receiver.status = lambda body: 503  # nothing leaves the outbox
    signals = _webhook_signals(receiver.url, tmp_path / "data", only_ng=True)
    signals.start()
    path = tmp_path / "data" / OUTBOX_FILE

    def rows() -> list[dict[str, Any]]:
        with sqlite3.connect(path) as conn:  # a fresh connection: sees only what is committed
            return [json.loads(p) for (p,) in conn.execute("SELECT payload FROM outbox WHERE sink = 'webhook'")]

    durable = [_message(0), _message(1, "OK"), _message(2)]
    await signals.publish(durable, durable=True)
    assert rows() == [durable[0], durable[2]]  # only_ng filters at publish
    await signals.publish([_message(3)], durable=False)
    await _until(lambda: len(rows()) == 3, "the fast publish committed within its window")
    await signals.close(0.2)
    await signals.publish([_message(4)], durable=True)  # after close: counted, never a hang
    assert _sample(signals.metrics.registry, "aoi_signals_dropped_total", sink="webhook", reason="closed") == 1
    assert len(rows()) == 3


@pytest.mark.anyio
async def test_webhook_outbox_survives_a_restart(receiver: Receiver, tmp_path: Path) -> None:
    up = threading.Event()
    receiver.status = lambda body: 200 if up.is_set() else 503
    first = _webhook_signals(receiver.url, tmp_path / "data")
    first.start()
    messages = [_message(i) for i in range(3)]
    await first.publish(messages, durable=True)
    await _until(lambda: len(receiver.seen()) >= 1, "a first attempt")
    await first.close(0.2)
    assert first.pending("webhook") == 3
    tried = receiver.seen()[0][1]["Idempotency-Key"]

    up.set()
    second = _webhook_signals(receiver.url, tmp_path / "data")
    second.start()
    await _until(lambda: len(receiver.delivered()) == 3, "the verdicts of the earlier run")
    assert receiver.delivered() == messages
    first_ok = next(h for status, h, _ in receiver.seen() if status == 200)
    assert first_ok["Idempotency-Key"] == tried  # the id is stable across the restart
    await second.close(5.0)


@pytest.mark.anyio
async def test_no_sink_configured_does_nothing(tmp_path: Path) -> None:
    signals = Signals(SignalsSettings(), tmp_path / "data")
    assert not signals.enabled
    signals.start()
    await signals.publish([_message(0)], durable=True)
    await signals.close(1.0)
    assert not (tmp_path / "data").exists()
