"""The webhook sink: a thread that POSTs each outbox message, in order, to ``signals.webhook.url``.

Delivery is at least once: a message is deleted from the outbox only after a 2xx, so a crash between the receiver's
answer and the delete sends it again; the ``Idempotency-Key`` header lets the receiver drop the duplicate.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from enum import Enum

import httpx

from service.settings import WebhookSettings
from service.signals.metrics import SignalMetrics
from service.signals.outbox import Outbox, OutboxEntry

__all__ = ["BASE_BACKOFF_S", "WebhookSender", "backoff_s", "is_retryable"]

logger = logging.getLogger(__name__)

SINK = "webhook"
BASE_BACKOFF_S = 0.2  # first retry wait; doubles per failed attempt up to max_backoff_ms
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


def backoff_s(attempt: int, max_s: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): exponential, capped at ``max_s``, "equal jitter"
    (AWS Architecture Blog, "Exponential Backoff And Jitter"): half the capped delay plus a random share of the other
    half, so several services retrying one receiver spread out while no wait collapses to zero."""
    delay = min(max_s, BASE_BACKOFF_S * 2.0 ** min(attempt, 30))
    return delay / 2 + rng.uniform(0.0, delay / 2)


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # absent, or an HTTP date: the backoff decides


class WebhookSender:
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
        self._url = settings.url
        self._settings = settings
        self._outbox = outbox
        self._metrics = metrics
        self._rng = random.Random()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aoi-signals-webhook", daemon=True)
        self._rejected_unlogged = 0
        self._rejected_logged_at = -_LOG_EVERY_S

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New rows were committed."""
        self._wake.set()

    def stop(self, timeout_s: float) -> None:
        """End the thread (after the attempt in progress, itself bounded by ``timeout_ms``)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        conn = self._outbox.connect()
        timeout = httpx.Timeout(self._settings.timeout_ms / 1000)
        headers = {"Content-Type": "application/json", **self._settings.headers}
        try:
            with httpx.Client(timeout=timeout, headers=headers, follow_redirects=False) as client:
                attempt = 0
                while not self._stop.is_set():
                    try:
                        attempt = self._send_some(conn, client, attempt)
                    except Exception:  # never let the thread die silently: the outbox would only grow
                        logger.error("webhook: sender failed; retrying in 1 s", exc_info=True)
                        self._stop.wait(1.0)
        finally:
            conn.close()

    def _send_some(self, conn: sqlite3.Connection, client: httpx.Client, attempt: int) -> int:
        """Send rows from the head of the outbox until one fails or none is left; returns the failed-attempt count."""
        self._wake.clear()
        batch = self._outbox.head(conn, SINK, limit=_BATCH)
        if not batch:
            self._wake.wait(1.0)
            return 0
        for entry in batch:
            if self._stop.is_set():
                break
            outcome, retry_after = self._post(client, entry)
            if outcome is _Outcome.RETRY:
                delay = backoff_s(attempt, self._settings.max_backoff_ms / 1000, self._rng)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self._settings.max_backoff_ms / 1000))
                self._stop.wait(delay)
                return attempt + 1  # read the head again: the writer may have dropped this row meanwhile
            self._outbox.delete(conn, SINK, [entry.id])
            if outcome is _Outcome.DELIVERED:
                self._metrics.sent(SINK, entry.enqueued_at)
            else:
                self._metrics.dropped(SINK, "rejected")
            attempt = 0
        return attempt

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
