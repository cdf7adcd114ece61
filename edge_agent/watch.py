"""The watch window: after a new version takes traffic, its inference error rate decides whether it stays.

The server records every request's outcome; when, within ``window_s`` of activation, at least
``min_requests`` have been served and the share that failed inside the model exceeds
``max_error_rate``, the watch calls ``on_breach`` once (the updater then rolls back). Bad input
(a 4xx) is the caller's fault and does not count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class HealthWatch:
    """Counts outcomes per version and fires once when a watched version breaches the error rate.

    Args:
        window_s: how long after activation a version is watched.
        max_error_rate: the share of failed requests that triggers a rollback.
        min_requests: how many requests must be seen before judging.
        on_breach: called with ``(version, reason)`` on a new thread.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        *,
        window_s: float,
        max_error_rate: float,
        min_requests: int,
        on_breach: Callable[[int, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_s = window_s
        self._max_error_rate = max_error_rate
        self._min_requests = min_requests
        self._on_breach = on_breach
        self._clock = clock
        self._lock = threading.Lock()
        self._version: int | None = None
        self._until = 0.0
        self._ok = self._failed = 0

    def watch(self, version: int) -> None:
        """Start watching ``version`` (just activated)."""
        with self._lock:
            self._version, self._until, self._ok, self._failed = version, self._clock() + self._window_s, 0, 0

    def record(self, version: int, ok: bool) -> None:
        with self._lock:
            if version != self._version or self._clock() > self._until:
                return
            if ok:
                self._ok += 1
            else:
                self._failed += 1
            total = self._ok + self._failed
            if total < self._min_requests or self._failed / total <= self._max_error_rate:
                return
            reason = (
                f"{self._failed} of {total} requests failed within {self._window_s:g}s of activation "
                f"(limit {self._max_error_rate:.0%})"
            )
            self._version = None  # fire once
        threading.Thread(target=self._on_breach, args=(version, reason), name="rollback", daemon=True).start()
