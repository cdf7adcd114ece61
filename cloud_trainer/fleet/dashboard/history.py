"""What the dashboard remembers beyond the retained documents, in memory and bounded: each
device's telemetry over time (latency and throughput charts) and the fleet's recent errors."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from cloud_trainer.fleet.view import DeviceRow

POINTS_PER_DEVICE = 360  # an hour at the default 10 s telemetry period
RECENT_ERRORS = 100
FAILED_STATES = ("rejected", "rolled-back")


@dataclass(frozen=True)
class Point:
    """One telemetry document, reduced to what the charts draw."""

    at: str  # the device's sent_at
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    error_rate: float


@dataclass(frozen=True)
class ErrorEvent:
    """Something that went wrong on a device, when it was reported."""

    at: str
    device: str
    kind: str  # "error" (the state's last_error), "update" (a version refused or rolled back), "problem"
    message: str


class History:
    """The last ``points`` telemetry points of every device; thread-safe (fed on the MQTT thread).

    Args:
        points: points kept per device; the oldest go first.
    """

    def __init__(self, *, points: int = POINTS_PER_DEVICE) -> None:
        if points < 1:
            raise ValueError(f"points must be at least 1, got {points}")
        self._points = points
        self._series: dict[str, deque[Point]] = {}
        self._lock = threading.Lock()

    def record(self, row: DeviceRow) -> bool:
        """Add the row's telemetry if it is new (another ``sent_at``); whether it was."""
        t = row.telemetry
        if t is None:
            return False
        point = Point(
            at=t.sent_at, requests_per_s=t.throughput_rps, p50_ms=t.latency_ms.p50, p99_ms=t.latency_ms.p99,
            error_rate=round(t.errors / t.requests, 4) if t.requests else 0.0,
        )  # fmt: skip
        with self._lock:
            series = self._series.setdefault(row.device, deque(maxlen=self._points))
            if series and series[-1].at == point.at:
                return False
            series.append(point)
        return True

    def forget(self, device: str) -> None:
        with self._lock:
            self._series.pop(device, None)

    def series(self, device: str) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(p) for p in self._series.get(device, ())]

    def count(self, device: str) -> int:
        with self._lock:
            return len(self._series.get(device, ()))


class ErrorLog:
    """The fleet's most recent errors, newest last; a device's error is logged once, when it changes.

    Args:
        size: events kept; the oldest go first.
    """

    def __init__(self, *, size: int = RECENT_ERRORS) -> None:
        self._events: deque[ErrorEvent] = deque(maxlen=size)
        self._last: dict[tuple[str, str], str] = {}  # (device, kind) -> the message last logged
        self._lock = threading.Lock()

    def record(self, row: DeviceRow) -> list[ErrorEvent]:
        """Log what is new on ``row``: a new last error, a failed update, an unreadable document."""
        s = row.state
        current = {
            "error": s.last_error if s else None,
            "update": f"v{s.update_version} {s.update_state}" if s and s.update_state in FAILED_STATES else None,
            "problem": row.problem,
        }
        at = (s.updated_at if s else None) or datetime.now(timezone.utc).isoformat(timespec="seconds")
        new = []
        with self._lock:
            for kind, message in current.items():
                key = (row.device, kind)
                if message is None:
                    self._last.pop(key, None)
                elif self._last.get(key) != message:
                    self._last[key] = message
                    new.append(ErrorEvent(at=at, device=row.device, kind=kind, message=message))
            self._events.extend(new)
        return new

    def recent(self) -> list[dict[str, Any]]:
        """Newest first."""
        with self._lock:
            return [asdict(e) for e in reversed(self._events)]
