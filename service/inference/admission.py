"""Admission: whether the service takes a request on, decided from its headers before any of it is decoded, and the
decode stage's bound (docs/service.md, "Admission and budgets").

A request is refused when what it would cost cannot fit beside what the service already holds:

- 413 (retrying cannot help): more model inputs than the queue holds (``queue_size``);
- 503 + ``Retry-After`` (not now): admitted requests hold too many decoded pixels (``max_inflight_pixels``), the
  decode stage is full (``decode_queue_images``), the queue has no room for its
  inputs beside those queued and those still decoding (``queue_size``), or the backlog ahead of it would keep it past
  its deadline at the rate the queue is measured to drain (``admit_by_deadline``), so it is refused in a millisecond
  instead of being decoded and computed for a 504.

``Retry-After`` is the backlog over the measured drain rate (else the recent answer rate), at least 1 s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service.core.errors import (
    DecodeBusy,
    MemoryBusy,
    Overloaded,
    RequestTooCostly,
    ShuttingDown,
    TooManyTiles,
    WouldMissDeadline,
)
from service.inference.batching import DynamicBatcher
from service.inference.metrics import SlidingRate

__all__ = ["DEADLINE_SAFETY", "Admission"]

# Admit only a request expected to be answered within this share of its deadline: the drain rate is measured, not
# promised (it falls when the load rises), and a request admitted at the edge would become a 504 after all its work.
DEADLINE_SAFETY = 0.75


class Admission:
    """Counts what admitted requests hold before their inputs reach the batcher's queue (images still to decode,
    their model inputs) and decides on each new request. Used on the event loop only."""

    def __init__(
        self,
        batcher: DynamicBatcher,
        *,
        decode_queue_images: int,
        by_deadline: bool,
        deadline_s: float,
        answered: SlidingRate,
        max_inflight_pixels: int = 400_000_000,
    ) -> None:
        self.batcher = batcher
        self.max_inflight_pixels = max_inflight_pixels
        self.inflight_pixels = 0  # decoded pixels of admitted requests not answered yet (what decoded frames hold)
        self.deadline_s = deadline_s  # deadline_ms: the deadline of untiled frames, the one the door checks
        self.decode_queue_images = decode_queue_images
        self.by_deadline = by_deadline
        self._answered = answered  # model inputs answered, the Retry-After fallback when no drain rate is measured
        self.decoding_images = 0
        self.reserved_inputs = 0  # model inputs of admitted requests not yet in the batcher's queue
        self.stopping = False  # SIGTERM: nothing new is admitted

    @property
    def backlog(self) -> int:
        """Model inputs queued for a batch or still decoding."""
        return self.batcher.depth + self.reserved_inputs

    def expected_wait_s(self, need: int, now: float) -> float | None:
        """Seconds until the last of ``need`` new inputs would be answered, or None before a drain rate is
        measured (the queue has been short)."""
        rate = self.batcher.drain.rate(now)
        if rate is None:
            return None
        # Round-robin: before the request's last input, at most ``need`` inputs of each queued request are served
        # (those still decoding are counted whole: they may queue first).
        ahead = self.batcher.ahead_of(need) + self.reserved_inputs
        return (ahead + need) / rate + self.batcher.batch_s

    def _retry_after(self, now: float) -> int:
        rate = self.batcher.drain.rate(now) or self._answered.rate(now)
        return min(60, max(1, math.ceil(self.backlog / rate))) if rate > 0 else 1

    def at_the_door(self, now: float) -> Overloaded | None:
        """The refusal every request would get now whatever it holds (checked before its body is read), or None.

        Even one model input cannot be taken when the decode stage or the queue is full, or when it would be answered
        too close to ``deadline_ms``, the deadline of untiled frames (:data:`DEADLINE_SAFETY`). A tiled frame's
        inputs would queue behind the same backlog, so it is refused too (its 30 s deadline would be spent waiting).
        """
        if self.stopping:
            return ShuttingDown(
                "shutting down: requests already admitted are answered, new ones are not taken", retry_after_s=5
            )
        if self.inflight_pixels >= self.max_inflight_pixels:
            return MemoryBusy(
                f"busy: admitted requests hold {self.inflight_pixels} decoded pixels (setting max_inflight_pixels "
                f"{self.max_inflight_pixels})",
                retry_after_s=self._retry_after(now),
            )
        if self.decoding_images >= self.decode_queue_images:
            return DecodeBusy(
                f"busy: {self.decoding_images} images are waiting to be decoded (setting decode_queue_images "
                f"{self.decode_queue_images})",
                retry_after_s=self._retry_after(now),
            )
        backlog = self.backlog
        if backlog >= self.batcher.queue_size:
            return Overloaded(
                f"busy: {backlog} model inputs queued or decoding, the queue holds {self.batcher.queue_size} "
                "(setting queue_size)",
                retry_after_s=self._retry_after(now),
            )
        wait = self.expected_wait_s(1, now) if self.by_deadline else None
        if wait is not None and wait > DEADLINE_SAFETY * self.deadline_s:
            return WouldMissDeadline(
                f"busy: at the measured rate a new image would be answered in about {wait * 1e3:.0f} ms, past the "
                f"deadline of {self.deadline_s * 1e3:.0f} ms (setting deadline_ms)",
                retry_after_s=self._retry_after(now),
            )
        return None

    def check(self, need: int, images: int, arrival: float, deadline: float, pixels: int = 0) -> None:
        """Admit or refuse a request of ``images`` images of ``pixels`` pixels in all that need ``need`` model inputs.

        Raises:
            TooManyTiles: the request alone needs more inputs than the queue holds.
            RequestTooCostly: the request alone holds more pixels than all requests together may.
            MemoryBusy, DecodeBusy, Overloaded, WouldMissDeadline: not now (503, ``retry_after_s`` set).
        """
        if self.stopping:
            raise ShuttingDown("shutting down: new requests are not taken", retry_after_s=5)
        capacity = self.batcher.queue_size
        if need > capacity:
            raise TooManyTiles(
                f"the request needs {need} model inputs, more than the queue holds ({capacity}, setting queue_size)"
            )
        if pixels > self.max_inflight_pixels:
            raise RequestTooCostly(
                f"the request holds {pixels} pixels, more than all requests together may "
                f"({self.max_inflight_pixels}, setting max_inflight_pixels)"
            )
        now = time.monotonic()
        if self.inflight_pixels + pixels > self.max_inflight_pixels:
            raise MemoryBusy(
                f"busy: admitted requests hold {self.inflight_pixels} decoded pixels, this request has {pixels} "
                f"(setting max_inflight_pixels {self.max_inflight_pixels})",
                retry_after_s=self._retry_after(now),
            )
        if self.decoding_images + images > self.decode_queue_images:
            raise DecodeBusy(
                f"busy: {self.decoding_images} images are waiting to be decoded, this request has {images} "
                f"(setting decode_queue_images {self.decode_queue_images})",
                retry_after_s=self._retry_after(now),
            )
        backlog = self.backlog
        if backlog + need > capacity:
            retry = self._retry_after(now)
            raise Overloaded(
                f"busy: {backlog} model inputs queued or decoding, this request needs {need} of {capacity} "
                f"(setting queue_size); retry in {retry} s",
                retry_after_s=retry,
            )
        if not self.by_deadline:
            return
        wait = self.expected_wait_s(need, now)
        budget = deadline - arrival
        if wait is not None and (now - arrival) + wait > DEADLINE_SAFETY * budget:
            retry = self._retry_after(now)
            raise WouldMissDeadline(
                f"busy: {backlog} model inputs are ahead of this request; at the measured rate it would be answered "
                f"in about {wait * 1e3:.0f} ms, past its deadline of {budget * 1e3:.0f} ms (setting deadline_ms); "
                f"retry in {retry} s",
                retry_after_s=retry,
            )

    @contextmanager
    def hold_pixels(self, pixels: int) -> Iterator[None]:
        """Count an admitted request's decoded pixels as held until it is answered (or fails)."""
        self.inflight_pixels += pixels
        try:
            yield
        finally:
            self.inflight_pixels -= pixels

    @contextmanager
    def hold(self, need: int, images: int) -> Iterator[None]:
        """Count an admitted request's images and inputs as held until its inputs are queued (or it fails)."""
        self.decoding_images += images
        self.reserved_inputs += need
        try:
            yield
        finally:
            self.decoding_images -= images
            self.reserved_inputs -= need
