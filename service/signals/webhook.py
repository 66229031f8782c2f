"""The webhook sink: a thread that POSTs each outbox message, in order, to ``signals.webhook.url``.

Delivery is at least once: a message is deleted from the outbox only after a 2xx, so a crash between the receiver's
answer and the delete sends it again; the ``Idempotency-Key`` header lets the receiver drop the duplicate.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from enum import Enum

import httpx

from service.settings import WebhookSettings
from service.signals.metrics import SignalMetrics
from service.signals.outbox import Outbox, OutboxEntry
from service.signals.sink import SinkThread, backoff_s

__all__ = ["WebhookSender", "is_retryable"]

logger = logging.getLogger(__name__)

SINK = "webhook"
_BATCH = 64  # rows read per query
_BODY_HEAD = 200  # characters of a rejecting answer's body in the log
_LOG_EVERY_S = 10.0


class _Outcome(Enum):
    DELIVERED = "delivered"
    REJECTED = "rejected"
    RETRY = "retry"


def is_retryable(status: int) -> bool:
    """True for answers worth another try: 5xx, 408 (timeout) and 429 (rate limit). Any other non-2xx (4xx, and 3xx:
    redirects are not followed, a moved URL is a configuration error) will be refused again: a permanent failure."""
    return status >= 500 or status in (408, 429)


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # absent, or an HTTP date: the backoff decides


class WebhookSender(SinkThread):
    """Sends the outbox rows of the webhook sink, oldest first; a failed message is retried (with backoff) before any
    later one, so the receiver sees verdicts in publishing order."""

    def __init__(self, settings: WebhookSettings, outbox: Outbox, metrics: SignalMetrics) -> None:
        if settings.url is None:
            raise ValueError("WebhookSender needs signals.webhook.url")
        try:
            scheme = httpx.URL(settings.url).scheme
        except httpx.InvalidURL as exc:
            raise ValueError(f"signals.webhook.url is not a valid URL: {exc}") from exc
        if scheme not in ("http", "https"):
            raise ValueError(f"signals.webhook.url must be http(s)://..., not {scheme or 'a relative URL'}")
        super().__init__("aoi-signals-webhook", "webhook")
        self._url = settings.url
        self._settings = settings
        self._outbox = outbox
        self._metrics = metrics
        self._rng = random.Random()
        self._attempt = 0  # failed attempts at the head message
        self._conn: sqlite3.Connection | None = None
        self._client: httpx.Client | None = None
        self._rejected_unlogged = 0
        self._rejected_logged_at = -_LOG_EVERY_S

    def open(self) -> None:
        self._conn = self._outbox.connect()
        headers = {"Content-Type": "application/json", **self._settings.headers}
        timeout = httpx.Timeout(self._settings.timeout_ms / 1000)
        self._client = httpx.Client(timeout=timeout, headers=headers, follow_redirects=False)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._conn is not None:
            self._conn.close()

    def step(self) -> float | None:
        """Send rows from the head of the outbox until one fails or none is left (stop: after the attempt in
        progress, itself bounded by ``timeout_ms``)."""
        if self.stopping:
            return None
        assert self._conn is not None and self._client is not None
        batch = self._outbox.head(self._conn, SINK, limit=_BATCH)
        if not batch:
            return 1.0
        for entry in batch:
            if self.stopping:
                return None
            outcome, retry_after = self._post(self._client, entry)
            if outcome is _Outcome.RETRY:
                delay = backoff_s(self._attempt, self._settings.max_backoff_ms / 1000, self._rng)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self._settings.max_backoff_ms / 1000))
                self._attempt += 1
                self.pause(delay)
                return 0.0  # read the head again: the writer may have dropped this row meanwhile
            self._outbox.delete(self._conn, SINK, [entry.id])
            if outcome is _Outcome.DELIVERED:
                self._metrics.sent(SINK, entry.enqueued_at)
            else:
                self._metrics.dropped(SINK, "rejected")
            self._attempt = 0
        return 0.0

    def _post(self, client: httpx.Client, entry: OutboxEntry) -> tuple[_Outcome, float | None]:
        ids = {"Idempotency-Key": entry.message_id, "X-AOI-Message-Id": entry.message_id}
        try:
            response = client.post(self._url, content=entry.payload.encode(), headers=ids)
        except httpx.HTTPError as exc:  # connection refused, timeout, reset
            self._metrics.failed(SINK)
            logger.debug("webhook: message %s not delivered (%s); will retry", entry.message_id, exc)
            return _Outcome.RETRY, None
        if response.is_success:
            return _Outcome.DELIVERED, None
        self._metrics.failed(SINK)
        if is_retryable(response.status_code):
            logger.debug("webhook: message %s got HTTP %d; will retry", entry.message_id, response.status_code)
            return _Outcome.RETRY, _retry_after_s(response)
        self._log_rejection(entry, response)
        return _Outcome.REJECTED, None

    def _log_rejection(self, entry: OutboxEntry, response: httpx.Response) -> None:
        """The status and body head of a refusal: the first at once, then one line every few seconds (a receiver
        refusing everything would otherwise log one line per verdict)."""
        self._rejected_unlogged += 1
        now = time.monotonic()
        if now - self._rejected_logged_at < _LOG_EVERY_S:
            return
        logger.error(
            "webhook: %d message(s) rejected and dropped (not retried); the last, %s: HTTP %d %r",
            self._rejected_unlogged,
            entry.message_id,
            response.status_code,
            response.text[:_BODY_HEAD],
        )
        self._rejected_unlogged = 0
        self._rejected_logged_at = now
