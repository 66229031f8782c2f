"""The Prometheus collectors of the service's life: live model swaps by result and the garbage collector's pauses,
declared once per registry (the app's, so /metrics shows them; names in docs/CONTRACTS.md)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["GC_PAUSE_BUCKETS", "LifecycleMetrics"]

GC_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, LifecycleMetrics] = weakref.WeakKeyDictionary()


class LifecycleMetrics:
    """Swaps and GC pauses. :meth:`on` returns the one instance of a registry (an app restarted in one process, as
    tests do, must not register the names twice)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.swaps = Counter("aoi_model_swaps", "Live model swaps by result (swapped, refused)", ["result"], registry=r)
        for result in ("swapped", "refused"):
            self.swaps.labels(result=result)
        self.gc_pause = Histogram(
            "aoi_gc_pause_seconds",
            "Passes of Python's garbage collector, each stopping every thread of the process",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=r,
        )
        for generation in ("0", "1", "2"):
            self.gc_pause.labels(generation=generation)

    @classmethod
    def on(cls, registry: CollectorRegistry) -> LifecycleMetrics:
        metrics = _BY_REGISTRY.get(registry)
        if metrics is None:
            metrics = _BY_REGISTRY[registry] = cls(registry)
        return metrics

    def model_swapped(self, result: str) -> None:
        """A live swap ended: ``swapped`` or ``refused``."""
        self.swaps.labels(result=result).inc()

    def gc_paused(self, pauses: Sequence[tuple[int, float]]) -> None:
        """Passes of the garbage collector: (generation, seconds) each (:class:`service.lifecycle.memory.GcPauses`)."""
        for generation, seconds in pauses:
            self.gc_pause.labels(generation=str(generation)).observe(seconds)
