"""Live model swap (docs/service.md, "Live model swap"): load a bundle beside the serving one, check it, switch.

Steps, each of which keeps the old model serving when it fails and says why (``SwapRefused``, the swap history in
/v1/model, ``aoi_model_swaps_total{result="refused"}``):

1. the path is a folder inside ``swap.bundle_root``;
2. ``bundle.json`` is valid and every file matches its sha256 (:func:`service.core.bundle.load_bundle`);
3. the backend loads it with the service's settings, and the thresholds / verdict overrides fit its classes;
4. every served batch size is warmed up, the output shape checked against bundle.json;
5. smoke check: the smoke image (``swap.smoke_image``, else the bundle's ``sample.*``, else a synthetic frame) runs
   on the backend with every output finite, then through the whole request path (plan, batch, merge, verdict);
6. switch: new requests are bound to the new model between two steps of the event loop; requests already admitted
   finish on the model they started with, which then retires (batcher stopped, backend freed).

Triggers: ``POST /v1/admin/bundle``, ``POST /v1/admin/rollback`` (one step back), ``SIGHUP`` (reload the served
folder) and, with ``swap.watch_s``, a watch of the served folder that reloads it once its files stop changing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from service.backends import backend_from_settings
from service.core.bundle import load_bundle
from service.core.errors import SwapInProgress, SwapRefused
from service.core.preprocess import decode_image, letterbox, to_input
from service.inference.serving import ServingModel, bundle_hash
from service.lifecycle.memory import refreeze_heap
from service.lifecycle.metrics import LifecycleMetrics

if TYPE_CHECKING:
    from service.inference.pipeline import InspectionService
    from service.inference.serving import ModelSlot

__all__ = ["ModelSwapper", "SwapEvent", "Trigger", "smoke_image_bytes"]

logger = logging.getLogger(__name__)

Trigger = Literal["api", "rollback", "sighup", "watch"]
_SAMPLE_NAMES = ("sample.jpg", "sample.jpeg", "sample.png", "sample.bmp", "sample.tif", "sample.tiff")
_HISTORY = 20  # swap events kept for /v1/model
_RETIRE_S = 60.0  # longest an old model waits for the requests bound to it


@dataclass(frozen=True)
class SwapEvent:
    """One swap attempt, as /v1/model lists it and the log says it."""

    at: str  # ISO 8601 UTC
    trigger: Trigger
    bundle: str  # the folder, relative to swap.bundle_root (never a host path)
    result: Literal["swapped", "refused"]
    from_version: str
    to_version: str | None
    reason: str | None
    duration_ms: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def smoke_image_bytes(configured: Path | None, bundle_dir: Path, width: int, height: int) -> bytes:
    """The image a new bundle must answer before it serves: ``configured``, else the bundle's ``sample.*``, else a
    deterministic textured frame at the model's input size (PNG).

    Raises:
        SwapRefused: the configured image cannot be read.
    """
    if configured is not None:
        try:
            return configured.read_bytes()
        except OSError as exc:
            raise SwapRefused(f"swap.smoke_image {configured.name}: cannot read it ({exc.strerror})") from exc
    for name in _SAMPLE_NAMES:
        if (bundle_dir / name).is_file():
            return (bundle_dir / name).read_bytes()
    import cv2

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    frame = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".png", frame)
    if not ok:
        raise RuntimeError("OpenCV could not encode the synthetic smoke frame")
    return bytes(buf.tobytes())


def _signature(root: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, size and mtime of every file under ``root``: changes whenever a file of the bundle is replaced."""
    try:
        return tuple(
            sorted((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)
                   for p in root.rglob("*") if p.is_file() and (st := p.stat()))
        )  # fmt: skip
    except OSError:
        return ()


async def _retire(old: ServingModel) -> None:
    """Retire the replaced model once its requests are answered, then collect what it left behind (the service froze
    its startup heap, the old model in it: :func:`refreeze_heap`)."""
    await old.retire(_RETIRE_S)
    del old
    refreeze_heap()


class ModelSwapper:
    """Swaps the service's model; one swap at a time (a second one while it runs gets ``SwapInProgress``)."""

    def __init__(self, slot: ModelSlot, service: InspectionService, metrics: LifecycleMetrics) -> None:
        """``slot``: the live model this swaps; ``service``: the pipeline a new model's smoke check runs through."""
        self._slot = slot
        self._svc = service
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self.history: deque[SwapEvent] = deque(maxlen=_HISTORY)
        self._previous: list[tuple[Path, str]] = []  # (folder, bundle hash) of the models swapped out, newest last
        self._retiring: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._sighup = False

    @property
    def root(self) -> Path | None:
        """The folder bundles may be loaded from: ``swap.bundle_root``, else the served bundle's parent."""
        cfg = self._svc.settings.swap.bundle_root
        if cfg is not None:
            return cfg
        source = self._slot.model.source
        return source.parent if source is not None else None

    def start(self) -> None:
        """SIGHUP handler (main thread only: ``aoi serve``) and the folder watch (``swap.watch_s`` > 0)."""
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            loop.add_signal_handler(signal.SIGHUP, self._reload_soon, "sighup")
            self._sighup = True
        every = self._svc.settings.swap.watch_s
        if every > 0 and self._slot.model.source is not None:
            self._watch = loop.create_task(self._watch_folder(every), name="aoi-bundle-watch")

    async def stop(self) -> None:
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def resolve(self, path: str) -> Path:
        """The bundle folder ``path`` names (relative to the bundle root, or absolute inside it).

        Raises:
            SwapRefused: no bundle root is known, or the path leaves it, or is not a folder, or the file system cannot
                resolve or stat it (a name too long, a NUL byte, a symlink loop, no permission: any ``OSError``).
        """
        root = self.root
        if root is None:
            raise SwapRefused("live swap needs swap.bundle_root: the served bundle was not loaded from a folder")
        try:
            root = root.resolve()
            candidate = (root / path).resolve()
            outside = candidate != root and root not in candidate.parents
            is_dir = not outside and candidate.is_dir()
        except (OSError, ValueError, RuntimeError) as exc:  # ValueError: NUL byte; RuntimeError: a symlink loop
            # the reason in words, never the host path an OSError or a symlink loop's RuntimeError would name
            why = (
                exc.strerror if isinstance(exc, OSError) else "a symlink loop" if isinstance(exc, RuntimeError) else exc
            )
            raise SwapRefused(f"bundle path {path[:200]!r}: not a usable path ({why})") from None
        if outside:
            raise SwapRefused(f"bundle path {path!r} is outside the bundle root (swap.bundle_root)")
        if not is_dir:
            raise SwapRefused(f"bundle path {path!r}: no such folder under the bundle root")
        return candidate

    def _relative(self, path: Path) -> str:
        root = self.root
        if root is not None:
            with contextlib.suppress(ValueError):
                return path.resolve().relative_to(root.resolve()).as_posix() or "."
        return path.name

    async def swap(self, path: Path, trigger: Trigger) -> SwapEvent:
        """Load, check and switch to the bundle in ``path``.

        Raises:
            SwapInProgress: another swap is running.
            SwapRefused: a check failed; the old model keeps serving.
        """
        if self._lock.locked():
            raise SwapInProgress("a model swap is already in progress; retry when it has finished")
        async with self._lock:
            return await self._swap(path, trigger, rollback=False)

    async def rollback(self) -> SwapEvent:
        """Go back one step, to the bundle served before the last swap, if its folder still holds the same files.

        Raises:
            SwapInProgress, SwapRefused: as :meth:`swap` (also: nothing to roll back to, or its files changed).
        """
        if self._lock.locked():
            raise SwapInProgress("a model swap is already in progress; retry when it has finished")
        async with self._lock:
            if not self._previous:
                raise SwapRefused("no previous bundle to roll back to (no swap since the service started)")
            path, digest = self._previous[-1]
            if await asyncio.to_thread(bundle_hash, path) != digest:
                event = self._event("rollback", path, None, "refused", 0.0,
                                    "the previous bundle's folder no longer holds the files it served (bundle.json "
                                    "changed); keep each version in its own folder to roll back")  # fmt: skip
                raise SwapRefused(event.reason or "")
            return await self._swap(path, "rollback", rollback=True)

    async def _swap(self, path: Path, trigger: Trigger, *, rollback: bool) -> SwapEvent:
        t0 = time.perf_counter()
        try:
            model = await self._load(path)
        except Exception as exc:
            reason = exc.message if isinstance(exc, SwapRefused) else f"{type(exc).__name__}: {exc}"
            event = self._event(trigger, path, None, "refused", t0, reason)
            raise SwapRefused(f"bundle {event.bundle} refused, still serving {event.from_version}: {reason}") from exc
        old = self._slot.replace(model)
        if rollback:
            self._previous.pop()
        elif old.source is not None:
            self._previous = [*self._previous[-(_HISTORY - 1) :], (old.source, old.hash)]
        task = asyncio.get_running_loop().create_task(_retire(old), name="aoi-retire-model")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return self._event(trigger, path, model.version, "swapped", t0, None, from_version=old.version)

    def _event(
        self,
        trigger: Trigger,
        path: Path,
        to_version: str | None,
        result: Literal["swapped", "refused"],
        t0: float,
        reason: str | None,
        *,
        from_version: str | None = None,
    ) -> SwapEvent:
        event = SwapEvent(
            at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            trigger=trigger,
            bundle=self._relative(path),
            result=result,
            from_version=from_version or self._slot.model.version,
            to_version=to_version,
            reason=reason,
            duration_ms=round((time.perf_counter() - t0) * 1e3, 1) if t0 else 0.0,
        )
        self.history.append(event)
        self._metrics.model_swapped(result)
        log = logger.info if result == "swapped" else logger.warning
        log("model swap (%s) %s: %s -> %s%s", trigger, result, event.from_version, to_version or event.bundle,
            f": {reason}" if reason else "")  # fmt: skip
        return event

    async def _load(self, path: Path) -> ServingModel:
        """Steps 2-5: a started, checked model for ``path`` (stopped again if a check fails)."""
        svc = self._svc
        settings = svc.settings.model_copy(update={"bundle": path})
        bundle = await asyncio.to_thread(load_bundle, path)
        choice = await asyncio.to_thread(backend_from_settings, settings, bundle)
        try:
            model = ServingModel(settings, bundle, choice, svc.metrics, path)
        except Exception:
            choice.backend.close()
            raise
        try:
            await model.start()
            data = smoke_image_bytes(settings.swap.smoke_image, path, bundle.input.width, bundle.input.height)
            spec = bundle.input
            rgb = decode_image(data, max_pixels=settings.max_image_pixels)
            batch = to_input([letterbox(rgb, (spec.height, spec.width), spec.pad_value)[0]], spec)
            await asyncio.to_thread(model.check_finite, batch)
            result = await svc.smoke(model, data)
            boxes = np.asarray([d.box_xyxy for d in result.detections], np.float64).reshape(-1, 4)
            if not np.isfinite(boxes).all():
                raise RuntimeError("the smoke image's detections have non-finite boxes")
        except BaseException:
            await model.stop()
            raise
        return model

    def _reload_soon(self, trigger: Trigger) -> None:
        asyncio.get_running_loop().create_task(self._reload(trigger), name=f"aoi-reload-{trigger}")

    async def _reload(self, trigger: Trigger) -> bool:
        """Reload the served folder (SIGHUP, watch); failures are logged and kept in the history, never raised."""
        source = self._slot.model.source
        if source is None:
            logger.warning("%s: the served bundle was not loaded from a folder; nothing to reload", trigger)
            return False
        try:
            await self.swap(source, trigger)
        except (SwapRefused, SwapInProgress) as exc:
            logger.warning("%s reload not done: %s", trigger, exc.message)
            return False
        return True

    async def _watch_folder(self, every_s: float) -> None:
        """Reload the served folder when its files changed and then stayed the same for one more period (a copy in
        progress is not loaded half-written). A refused version is not retried until the files change again."""
        source = self._slot.model.source
        assert source is not None
        seen = await asyncio.to_thread(_signature, source)
        pending: tuple[tuple[str, int, int], ...] | None = None
        while True:
            await asyncio.sleep(every_s)
            source = self._slot.model.source or source
            now = await asyncio.to_thread(_signature, source)
            if now == seen:
                pending = None
                continue
            if now != pending:
                pending = now  # changed: wait one period for it to settle
                continue
            await self._reload("watch")
            seen, pending = now, None
