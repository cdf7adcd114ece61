"""The model that serves now, swapped atomically while requests are in flight."""

from __future__ import annotations

import threading

from edge_agent.runtime.classifier import Classifier


class ModelHolder:
    """Holds the active classifier.

    A request takes a reference with :meth:`get` and uses it to the end, so a swap never fails a
    request in flight: the old model drains as its last requests finish and is then freed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: Classifier | None = None

    def get(self) -> Classifier | None:
        return self._current

    def swap(self, model: Classifier) -> Classifier | None:
        with self._lock:
            previous, self._current = self._current, model
        return previous
