"""The live model: one :class:`ModelSlot` per service holds the :class:`ServingModel` (bundle + backend + thresholds +
batcher) that new requests are bound to. Each request takes ``slot.model`` once, at admission, and keeps it to the
end; a live swap or rollback (:mod:`service.lifecycle.swap`) puts another model in the slot with :meth:`replace`.

It lives here, beside its readers, so that inference never imports lifecycle: lifecycle writes the slot, inference
only reads it."""

from __future__ import annotations

from collections.abc import Callable

from service.inference.metrics import StageObserver
from service.inference.serving import ServingModel

__all__ = ["ModelSlot"]


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
