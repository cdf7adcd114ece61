"""Periodic telemetry on MQTT: latency percentiles, throughput, errors, CPU and memory, active version."""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from edge_agent.outbox import OutboxStats
from edge_agent.protocol.telemetry import Latency, SamplesTelemetry, Telemetry
from edge_agent.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TelemetryPublisher:
    """Publishes a :class:`Telemetry` document every ``interval_s`` until stopped.

    Args:
        interval_s: the period.
        metrics: the serving metrics to summarise.
        publish: sends one payload (the app wires it to MQTT).
        describe: returns ``(device, fleet, model, active_version, queue_depth)``.
        outbox: returns the sample outbox's counts.
    """

    def __init__(
        self,
        *,
        interval_s: float,
        metrics: ServingMetrics,
        publish: Callable[[bytes], None],
        describe: Callable[[], tuple[str, str, str, int | None, int]],
        outbox: Callable[[], OutboxStats] | None = None,
    ) -> None:
        self._outbox = outbox
        self._interval_s = interval_s
        self._metrics = metrics
        self._publish = publish
        self._describe = describe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._cpu = self._cpu_seconds()
        self._wall = time.monotonic()

    @staticmethod
    def _cpu_seconds() -> float:
        times = os.times()
        return times.user + times.system

    def start(self) -> None:
        if self._interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        """Stop publishing; returns once the thread has ended (a publish under way finishes first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def snapshot(self) -> Telemetry:
        cpu, wall = self._cpu_seconds(), time.monotonic()
        cpu_percent = 100 * (cpu - self._cpu) / max(wall - self._wall, 1e-6)
        self._cpu, self._wall = cpu, wall
        device, fleet, model, version, depth = self._describe()
        stats = self._outbox() if self._outbox else None
        samples = None
        if stats is not None:
            samples = SamplesTelemetry(
                queued=stats.queued, queued_bytes=stats.bytes, dropped=stats.dropped, uploaded=stats.uploaded
            )
        window = self._metrics.window(self._interval_s or 60.0)
        return Telemetry(
            device=device, fleet=fleet, model=model, active_version=version, window_s=self._interval_s or 60.0,
            requests=window["requests"], errors=window["errors"], throughput_rps=window["throughput_rps"],
            latency_ms=Latency(**window["latency_ms"]), queue_depth=depth, cpu_percent=round(cpu_percent, 1),
            rss_mb=round(rss_mb(), 1), samples=samples,
            sent_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._publish(self.snapshot().to_bytes())
            except Exception:
                log.exception("telemetry failed")
