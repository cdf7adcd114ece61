"""The watch window with a fake clock: when a new version's error rate triggers a rollback, and when
it does not. Milliseconds, no broker; the rollback it triggers, end to end against a real Mosquitto
and agent process, is in tests/edge_agent/test_update_path.py and tests/edge_agent/test_front_door.py."""

from __future__ import annotations

import threading
import time

from edge_agent.watch import HealthWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Breaches:
    """Collects ``on_breach`` calls, which HealthWatch makes on threads named "rollback"."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def __call__(self, version: int, reason: str) -> None:
        with self._lock:
            self.calls.append((version, reason))

    def settled(self, timeout_s: float = 10.0) -> list[tuple[int, str]]:
        """The calls, once every rollback thread already started has run.

        ``record`` starts the thread before it returns, so after this nothing more can arrive from
        the calls made so far: a check that nothing fired needs no sleep.
        """
        deadline = time.monotonic() + timeout_s
        while any(t.name == "rollback" and t.is_alive() for t in threading.enumerate()):
            assert time.monotonic() < deadline, "a rollback callback did not finish"
            time.sleep(0.001)
        with self._lock:
            return list(self.calls)


def watch(clock: Clock, breaches: Breaches, *, window_s: float = 60, min_requests: int = 10) -> HealthWatch:
    return HealthWatch(window_s=window_s, max_error_rate=0.2, min_requests=min_requests, on_breach=breaches,
                       clock=clock)  # fmt: skip


def test_a_breach_fires_once_after_enough_requests() -> None:
    breaches = Breaches()
    hw = watch(Clock(), breaches)
    hw.watch(2)
    for _ in range(6):
        hw.record(2, ok=True)
    for _ in range(3):
        hw.record(2, ok=False)
    assert breaches.settled() == []  # 3 of 9 failed, but 9 is under min_requests
    hw.record(2, ok=False)  # 4 of 10 > 20%
    (call,) = breaches.settled()
    assert call == (2, "4 of 10 requests failed within 60s of activation (limit 20%)")
    for _ in range(20):
        hw.record(2, ok=False)
    assert len(breaches.settled()) == 1  # once


def test_an_error_rate_at_the_limit_is_no_breach() -> None:
    breaches = Breaches()
    hw = watch(Clock(), breaches)
    hw.watch(2)
    for i in range(50):
        hw.record(2, ok=i % 5 != 4)  # every fifth fails: never over 20%
    assert breaches.settled() == []


def test_only_the_watched_version_and_only_within_the_window_count() -> None:
    clock, breaches = Clock(), Breaches()
    hw = watch(clock, breaches, min_requests=2)
    for _ in range(5):
        hw.record(1, ok=False)  # nothing watched yet
    hw.watch(2)
    for _ in range(5):
        hw.record(1, ok=False)  # the old version's failures are not the new one's
    clock.now += 61  # past the window
    for _ in range(5):
        hw.record(2, ok=False)
    assert breaches.settled() == []
    hw.watch(3)  # a new activation opens a new window, with fresh counts
    hw.record(3, ok=False)
    hw.record(3, ok=False)
    assert [version for version, _ in breaches.settled()] == [3]
