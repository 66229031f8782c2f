"""One bundle loaded on its backend with its own batcher: the model a request is bound to when it is admitted.

A live swap (docs/service.md, "Live model swap") builds a second :class:`ServingModel` beside the serving one, warms it
up and smoke-checks it, then the service points new requests at it; the old one answers what it holds and retires.
Nothing here knows about HTTP.

The live model: one :class:`ModelSlot` per service holds the :class:`ServingModel` (bundle + backend + thresholds +
batcher) that new requests are bound to. Each request takes ``slot.model`` once, at admission, and keeps it to the
end; a live swap or rollback (:mod:`service.lifecycle.swap`) puts another model in the slot with :meth:`replace`.

It lives here, beside its readers, so that inference never imports lifecycle: lifecycle writes the slot, inference
only reads it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends import BackendChoice
from service.core.bundle import BUNDLE_FILE, ModelBundle, VerdictRule, sha256_file
from service.core.frames import TilingMode, TilingPolicy, assemble_rows, resolve_policy
from service.core.postprocess import Detections, postprocess
from service.core.preprocess import LetterboxInfo, input_dtype
from service.inference.batching import DynamicBatcher, resolve_max_delay_ms
from service.inference.metrics import ModelLabels, StageObserver
from service.settings import Settings

__all__ = ["ModelSlot", "ServingModel", "bundle_hash", "effective_thresholds"]


logger = logging.getLogger(__name__)


def effective_thresholds(bundle: ModelBundle, overrides: dict[str, float]) -> dict[str, float]:
    """Per-class thresholds: the bundle's, replaced by ``overrides`` (settings).

    Raises:
        ValueError: an override names a class the bundle does not have.
    """
    unknown = sorted(set(overrides) - set(bundle.classes))
    if unknown:
        raise ValueError(f"score_thresholds: unknown classes {unknown}; the bundle has {bundle.classes}")
    base = dict(zip(bundle.classes, bundle.thresholds(), strict=True))
    return {**base, **overrides}


def bundle_hash(root: Path | None) -> str:
    """sha256 of the bundle's ``bundle.json`` (which holds the sha256 of every other file): names exactly the files
    that answered. Empty when the bundle was passed in memory without its folder (tests)."""
    if root is None or not (root / BUNDLE_FILE).is_file():
        return ""
    return sha256_file(root / BUNDLE_FILE)


@dataclass
class _Use:
    """Requests bound to a model and not yet answered; ``idle`` is set whenever there are none."""

    count: int = 0
    idle: asyncio.Event | None = None


class ServingModel:
    """A bundle, its backend, thresholds, verdict rule, tiling policies and batcher. Built from settings the same way
    at startup and at every swap, so a swapped-in model serves exactly as it would after a restart.

    Raises (constructor):
        ValueError: the settings' threshold or verdict overrides name classes this bundle does not have.
    """

    def __init__(
        self,
        settings: Settings,
        bundle: ModelBundle,
        choice: BackendChoice,
        metrics: StageObserver,
        source: Path | None,
    ) -> None:
        self.bundle = bundle
        self.source = source  # the bundle folder (None: passed in memory)
        self.hash = bundle_hash(source)
        self.backend = choice.backend
        self.backend_reason = choice.reason
        self.thresholds = effective_thresholds(bundle, settings.score_thresholds)
        self._thr = np.asarray([self.thresholds[c] for c in bundle.classes], np.float32)
        self.verdict_rule: VerdictRule = settings.verdict or bundle.verdict
        unknown = sorted(set(self.verdict_rule.reject_classes or []) - set(bundle.classes))
        if unknown:
            raise ValueError(f"verdict.reject_classes: unknown classes {unknown}; the bundle has {bundle.classes}")
        self.tiling = resolve_policy(bundle, settings.tiling)
        self.policies: dict[TilingMode, TilingPolicy] = {
            m: resolve_policy(bundle, settings.tiling, m) for m in ("auto", "on", "off")
        }
        spec = bundle.input
        self.batcher = DynamicBatcher(
            self.backend,
            max_batch_size=settings.max_batch_size,
            max_delay_ms=resolve_max_delay_ms(settings.max_delay_ms, choice.backend.kind),
            queue_size=settings.queue_size,
            instances=choice.instances,
            finish=self._postprocess,
            assemble=assemble_rows(spec),
            input_shape=spec.sample_shape,
            input_dtype=input_dtype(spec),
            metrics=metrics,
            thread_niceness=settings.worker_niceness,
        )
        self.warmup_ms: dict[int, float] = {}
        self.loaded_at = time.time()
        self._use = _Use()

    @property
    def labels(self) -> ModelLabels:
        b, backend = self.bundle, self.backend
        return ModelLabels(b.name, b.version, b.architecture, backend.kind, backend.precision, backend.device)

    @property
    def version(self) -> str:
        return self.bundle.version

    async def start(self) -> None:
        """Warm up every served batch size (off the event loop), then start batching.

        Raises:
            RuntimeError: warm-up skipped a batch size; whatever the backend raises (wrong output shape: a model
            that does not match its bundle.json).
        """
        loop = asyncio.get_running_loop()
        self.warmup_ms = await loop.run_in_executor(None, self.backend.warmup)
        missing = set(self.backend.batch_sizes) - set(self.warmup_ms)
        if missing:
            raise RuntimeError(f"warm-up skipped batch sizes {sorted(missing)}")
        await self.batcher.start()

    def check_finite(self, batch: npt.NDArray[Any]) -> None:
        """Run ``batch`` on the backend directly and refuse a model whose outputs are not finite (a broken export
        answers NaN scores, which no threshold passes: every part would be OK, silently).

        Raises:
            RuntimeError: the output holds NaN or infinity.
        """
        out = np.asarray(self.backend.infer(batch))
        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        if bad:
            raise RuntimeError(f"the model answered {bad} non-finite values (NaN or infinity) of {out.size}")

    def acquire(self) -> None:
        """A request is bound to this model (called when it is admitted)."""
        self._use.count += 1
        if self._use.idle is not None:
            self._use.idle.clear()

    def release(self) -> None:
        """A request bound to this model is answered (or failed)."""
        self._use.count -= 1
        if self._use.count == 0 and self._use.idle is not None:
            self._use.idle.set()

    @property
    def in_use(self) -> int:
        return self._use.count

    async def retire(self, timeout_s: float) -> None:
        """After a swap: wait (up to ``timeout_s``) until the requests bound to this model are answered, then stop
        its batcher and free its backend. Requests still bound past the timeout fail with the batcher's stop."""
        if self._use.count:
            self._use.idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._use.idle.wait(), timeout_s)
            except TimeoutError:
                logger.warning(
                    "retiring %s %s with %d request(s) still bound after %.0f s",
                    self.bundle.name, self.version, self._use.count, timeout_s,
                )  # fmt: skip
        await self.stop()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.backend.close()

    def _postprocess(self, out: npt.NDArray[np.float32], infos: Sequence[LetterboxInfo]) -> list[Detections]:
        """The batcher's ``finish``: one batch's raw outputs -> detections, on the inference thread."""
        pp = self.bundle.postprocess
        return postprocess(
            out,
            infos,
            self._thr,
            nms_iou=pp.nms_iou,
            max_detections=pp.max_detections,
            max_candidates=pp.max_candidates,
        )


class ModelSlot:
    """Holds the serving model; :meth:`replace` tells the metrics and every listener (the admission's batcher)."""

    def __init__(self, model: ServingModel, metrics: StageObserver) -> None:
        self._model = model
        self._metrics = metrics
        self._listeners: list[Callable[[ServingModel], None]] = []

    @property
    def model(self) -> ServingModel:
        return self._model

    def on_replace(self, listener: Callable[[ServingModel], None]) -> None:
        """Call ``listener(new_model)`` after every :meth:`replace`."""
        self._listeners.append(listener)

    def loaded(self) -> None:
        """Report the model in the slot to the metrics (once it is started)."""
        self._metrics.model_loaded(self._model.labels, self._model.bundle.classes)

    def replace(self, model: ServingModel) -> ServingModel:
        """Point new requests at ``model`` (started and checked); returns the model it replaces, which the caller
        retires. Runs between two statements of the event loop, so every request is bound to exactly one of them."""
        old, self._model = self._model, model
        for listener in self._listeners:
            listener(model)
        self.loaded()
        return old
