"""The MQTT sink: outbox messages published to ``<topic_prefix>/<camera_id>`` with paho-mqtt 2 (MQTT 3.1.1).

paho's network thread (``loop_start``) connects, reconnects with backoff and retransmits unacknowledged QoS 1/2
messages after a reconnect; our thread feeds it from the outbox, at most :data:`MAX_IN_FLIGHT` at a time (a dead
broker must not pile the outbox into paho's memory), and deletes a row once the broker acknowledged it.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from service.settings import MqttSettings
from service.signals.metrics import SignalMetrics
from service.signals.outbox import Outbox, OutboxEntry
from service.signals.sink import SinkThread

__all__ = ["MAX_IN_FLIGHT", "RECONNECT_MAX_S", "RECONNECT_MIN_S", "MqttSender", "topic_for"]

logger = logging.getLogger(__name__)

SINK = "mqtt"
MAX_IN_FLIGHT = 100  # published and not yet acknowledged
RECONNECT_MIN_S = 1  # paho doubles the wait per failed attempt, up to the max (whole seconds: paho's API)
RECONNECT_MAX_S = 15
KEEPALIVE_S = 30
_UNSAFE = str.maketrans({"+": "_", "#": "_", "/": "_", "\0": "_"})


def topic_for(prefix: str, camera_id: object) -> str:
    """``prefix/camera_id``; the wildcards ``+ #``, ``/`` (a level separator) and NUL in the camera id become ``_``,
    so one camera is one topic level; no camera id (None, empty) is ``none``."""
    camera = "" if camera_id is None else str(camera_id).translate(_UNSAFE)
    return f"{prefix.rstrip('/')}/{camera or 'none'}"


class MqttSender(SinkThread):
    """Publishes the outbox rows of the MQTT sink, in id order, and deletes each once acknowledged (QoS 1: PUBACK,
    QoS 2: PUBCOMP, QoS 0: written to the socket)."""

    def __init__(self, settings: MqttSettings, outbox: Outbox, metrics: SignalMetrics) -> None:
        if settings.host is None:
            raise ValueError("MqttSender needs signals.mqtt.host")
        super().__init__("aoi-signals-mqtt", "mqtt")
        self._host = settings.host
        self._settings = settings
        self._outbox = outbox
        self._metrics = metrics
        self._connected = threading.Event()
        self._reconnected = threading.Event()  # a new connection: QoS 0 messages in flight are lost, send again
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()  # mids acknowledged, from paho's thread
        self._in_flight: dict[int, OutboxEntry] = {}  # mid -> entry; our thread only
        self._cursor = 0  # highest outbox id handed to paho; our thread only
        self._conn: sqlite3.Connection | None = None
        self._client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        s = self._settings
        # clean_session=False: the broker keeps our session (and QoS 1/2 state) across reconnects.
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id, clean_session=False)
        if s.username is not None:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_inflight_messages_set(MAX_IN_FLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def start(self) -> None:
        """Connect in the background (a broker that is down now is retried, never a startup failure)."""
        self._client.connect_async(self._host, self._settings.port, keepalive=KEEPALIVE_S)
        self._client.loop_start()
        super().start()

    def stop(self, timeout_s: float) -> bool:
        """Disconnect and end both threads; unacknowledged rows stay in the outbox."""
        ended = super().stop(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()
        return ended

    # paho's network thread: record and wake our thread, never call back into the client (its locks are held).
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            logger.warning("mqtt: broker %s:%d refused the connection: %s", self._host, self._settings.port, reason)
            return
        logger.info("mqtt: connected to %s:%d", self._host, self._settings.port)
        self._connected.set()
        self._reconnected.set()
        self.wake()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._connected.is_set() and not self.stopping:
            logger.warning("mqtt: disconnected from %s:%d (%s); reconnecting", self._host, self._settings.port, reason)
        self._connected.clear()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._acks.put(mid)
        self.wake()

    # our thread
    def open(self) -> None:
        self._conn = self._outbox.connect()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def step(self) -> float | None:
        """Settle what was acknowledged, then hand paho more rows while connected."""
        if self.stopping:
            return None
        assert self._conn is not None
        self._settle(self._conn)
        if self._connected.is_set():
            self._feed(self._conn)
        return 0.5

    def _settle(self, conn: sqlite3.Connection) -> None:
        """Delete what the broker acknowledged; after a reconnect, send the QoS 0 messages in flight again."""
        acked: list[OutboxEntry] = []
        while True:
            try:
                entry = self._in_flight.pop(self._acks.get_nowait(), None)
            except queue.Empty:
                break
            if entry is not None:  # None: an ack from before a reset below
                acked.append(entry)
        if acked:
            self._outbox.delete(conn, SINK, [e.id for e in acked])
            for e in acked:
                self._metrics.sent(SINK, e.enqueued_at)
        if self._reconnected.is_set():
            self._reconnected.clear()
            # QoS 1/2: paho retransmits its unacknowledged messages itself (same mids). QoS 0 messages not yet
            # written are gone with the old socket: rewind the cursor so they are read from the outbox again.
            if self._settings.qos == 0 and self._in_flight:
                self._cursor = min(e.id for e in self._in_flight.values()) - 1
                self._in_flight.clear()

    def _feed(self, conn: sqlite3.Connection) -> None:
        """Hand paho the next rows, up to :data:`MAX_IN_FLIGHT` unacknowledged."""
        room = MAX_IN_FLIGHT - len(self._in_flight)
        if room <= 0:
            return
        for entry in self._outbox.head(conn, SINK, after_id=self._cursor, limit=room):
            topic = topic_for(self._settings.topic_prefix, self._camera_id(entry))
            info = self._client.publish(topic, entry.payload.encode(), qos=self._settings.qos)
            # QoS 1/2 while disconnected: paho queues it (rc NO_CONN) and sends it after the reconnect. QoS 0 then
            # is not kept: leave it in the outbox and try again once connected.
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and (
                self._settings.qos == 0 or info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN
            ):
                self._metrics.failed(SINK)
                return
            self._in_flight[info.mid] = entry
            self._cursor = entry.id

    @staticmethod
    def _camera_id(entry: OutboxEntry) -> object:
        try:
            message = json.loads(entry.payload)
        except ValueError:
            return None
        return message.get("camera_id") if isinstance(message, dict) else None
