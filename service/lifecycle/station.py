"""One service instance from start to stop: opens the records and the signals, loads the model into its slot, warms it
up, starts the pipeline, the swapper and the memory tasks, and at the end drains and closes them in order. The app's
lifespan is this object's :meth:`Station.open`, :meth:`Station.start` and :meth:`Station.stop`."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from service.backends import BackendChoice, InferenceBackend, backend_from_settings, instances_for
from service.core.bundle import BundleError, ModelBundle, load_bundle
from service.core.results import ModelInfo, SwapInfo
from service.inference.metrics import ServiceMetrics
from service.inference.pipeline import InspectionService
from service.inference.serving import ModelSlot, ServingModel
from service.lifecycle import memory
from service.lifecycle.metrics import LifecycleMetrics
from service.lifecycle.plant import PlantLink
from service.lifecycle.swap import ModelSwapper
from service.records.store import RecordStage, RecordStore
from service.settings import Settings
from service.signals.hub import Signals

__all__ = ["Station"]

logger = logging.getLogger(__name__)


def _open_records(
    settings: Settings, metrics: ServiceMetrics, plant: PlantLink | None
) -> tuple[RecordStore | None, Signals | None]:
    """The record store (``records.enabled``, forwarding to the plant when ``plant`` is given) and the signals (a
    sink configured) under ``data_dir``, started.

    Raises:
        whatever opening them raises (an unusable data folder): startup fails and says why.
    """
    store = None
    if settings.records.enabled:
        prunable = plant.prunable_seq if plant is not None else None
        store = RecordStore(settings.records, settings.data_dir, metrics.registry, prunable_seq=prunable)
        store.start()
        if plant is not None:
            plant.start()
        logger.info(
            "records: every answered image is recorded in %s (%s), NG images kept under %s",
            store.db_path.resolve(), settings.records.durability, (settings.data_dir / "images").resolve(),
        )  # fmt: skip
    signals = Signals(settings.signals, settings.data_dir, metrics.registry)
    if not signals.enabled:
        return store, None
    signals.start()
    return store, signals


def _source_folder(folder: Path, bundle: ModelBundle) -> Path | None:
    """``folder`` when it holds ``bundle`` (it was loaded from there), for its hash and SIGHUP reloads; None when the
    bundle was built in memory (tests)."""
    try:
        return folder if load_bundle(folder, verify_hashes=False) == bundle else None
    except BundleError:
        return None


async def _record_gc(pauses: memory.GcPauses, metrics: LifecycleMetrics, every_s: float = 1.0) -> None:
    """Move the collector's pauses into ``aoi_gc_pause_seconds`` every ``every_s`` (not from inside the hook)."""
    while True:
        await asyncio.sleep(every_s)
        metrics.gc_paused(pauses.drain())


class Station:
    """The records, signals, live model, pipeline and swapper of one service instance (build with :meth:`open`)."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        service: InspectionService,
        store: RecordStore | None,
        signals: Signals | None,
        plant: PlantLink | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.service = service
        self.slot = service.slot
        self.records = store
        self.signals = signals
        self.plant = plant
        self.life_metrics = LifecycleMetrics.on(metrics.registry)
        self.swapper = ModelSwapper(self.slot, service, self.life_metrics)
        self._gc_pauses = memory.GcPauses()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(
        cls,
        settings: Settings,
        metrics: ServiceMetrics,
        bundle: ModelBundle | None = None,
        backend: BackendChoice | InferenceBackend | None = None,
    ) -> Station:
        """Load the bundle and backend (unless passed pre-loaded), open the records and signals, and build the model
        slot and the pipeline; nothing serves until :meth:`start`."""
        b = bundle if bundle is not None else await asyncio.to_thread(load_bundle, settings.bundle)
        choice = backend
        if choice is None:
            choice = await asyncio.to_thread(backend_from_settings, settings, b)
        if not isinstance(choice, BackendChoice):
            n = instances_for(choice.kind, settings.instances, choice)
            choice = BackendChoice(choice, f"{choice.kind} passed to create_app", n)
        plant = PlantLink.open(settings, metrics.registry)
        store, signals = await asyncio.to_thread(_open_records, settings, metrics, plant)
        model = ServingModel(settings, b, choice, metrics, _source_folder(settings.bundle, b))
        service = InspectionService(
            settings,
            ModelSlot(model, metrics),
            metrics,
            recorder=RecordStage(settings.records, store, signals, (settings.station_id, settings.line_id)),
        )
        return cls(settings, metrics, service, store, signals, plant)

    async def start(self, *, freeze_heap: bool = False) -> None:
        """Warm up every served batch size (off the event loop), start batching and the background tasks, then
        report ready. ``freeze_heap``: then keep the startup heap out of the collector's full passes."""
        m = self.slot.model
        await m.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(memory.trim_when_idle(self.service, self.service.pool), name="aoi-trim"))
        self.swapper.start()
        self.slot.loaded()
        self.service.set_ready(True)
        logger.info(
            "ready: bundle %s %s on %s (%s, %s), %d instance(s); warm-up ms per batch size %s",
            m.bundle.name, m.version, m.backend.kind, m.backend.device, m.backend.precision, m.batcher.instances,
            {k: round(v, 2) for k, v in m.warmup_ms.items()},
        )  # fmt: skip
        if freeze_heap:
            memory.freeze_heap()
        self._gc_pauses.start()
        self._tasks.append(loop.create_task(_record_gc(self._gc_pauses, self.life_metrics), name="aoi-gc"))

    def identity(self) -> dict[str, Any]:
        """``GET /v1/station``: who this station is and how its records reach the plant (no secret in it)."""
        return {
            "station_id": self.settings.station_id,
            "line_id": self.settings.line_id,
            "records": self.records is not None,
            "central": self.plant.state() if self.plant is not None else None,
        }

    def model_info(self) -> ModelInfo:
        """``GET /v1/model``: the live model and the swap history."""
        return self.service.model_info([SwapInfo.model_validate(e.as_dict()) for e in self.swapper.history])

    async def stop(self) -> None:
        """Stop the background tasks, the swapper and the model, then flush and close the records and the signals
        within a share of ``stop_timeout_ms``."""
        self._gc_pauses.stop()
        for task in self._tasks:
            task.cancel()
        self.life_metrics.gc_paused(self._gc_pauses.drain())
        logger.info("shutting down")
        t0 = time.monotonic()
        self.service.set_ready(False)
        await self.swapper.stop()
        await self.slot.model.stop()
        self.service.close()
        flush_s = max(1.0, 0.25 * self.settings.stop_timeout_ms / 1000.0)
        if self.records is not None:
            await self.records.close(flush_s)
        if self.signals is not None:
            await self.signals.close(max(0.5, flush_s - (time.monotonic() - t0)))
        if self.plant is not None:  # after the records: their last commits are in the journal for the next start
            await self.plant.stop(max(0.5, flush_s - (time.monotonic() - t0)))
        logger.info("stopped in %.2f s after the last request", time.monotonic() - t0)
