"""Serving metrics: Prometheus counters and histograms for ``/metrics``, and a rolling window of
latencies for the periodic MQTT telemetry."""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from edge_agent.outbox import OutboxStats

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _stat(stats: Callable[[], OutboxStats], field: str) -> float:
    return float(getattr(stats(), field))


class ServingMetrics:
    """One registry per agent (so tests can run several in a process)."""

    def __init__(self, *, window: int = 4096) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edge_agent_requests", "Inference requests answered", ["endpoint", "code"], registry=self.registry
        )
        self.inference_errors = Counter(
            "edge_agent_inference_errors", "Requests whose model run failed", registry=self.registry
        )
        self.latency = Histogram(
            "edge_agent_request_latency_seconds", "Time to answer an inference request",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "edge_agent_batch_size", "Inputs per onnxruntime run", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("edge_agent_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.active_version = Gauge("edge_agent_active_version", "Model version serving", registry=self.registry)
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, float, bool]] = deque(maxlen=window)  # (time, seconds, ok)

    def track_outbox(self, stats: Callable[[], OutboxStats]) -> None:
        """Expose the sample outbox's counts, read at scrape time."""
        for name, doc, field in (
            ("edge_agent_samples_queued", "Samples waiting in the outbox for upload", "queued"),
            ("edge_agent_samples_queued_bytes", "Bytes of samples waiting in the outbox", "bytes"),
            ("edge_agent_samples_dropped", "Samples dropped because the outbox or disk was full", "dropped"),
            ("edge_agent_samples_uploaded", "Samples acknowledged by the broker", "uploaded"),
        ):
            gauge = Gauge(name, doc, registry=self.registry)
            gauge.set_function(functools.partial(_stat, stats, field))

    def observe(self, endpoint: str, code: int, seconds: float, *, inference_failed: bool = False) -> None:
        self.requests.labels(endpoint=endpoint, code=str(code)).inc()
        if inference_failed:
            self.inference_errors.inc()
        if code < 400 or inference_failed:
            self.latency.labels(endpoint=endpoint).observe(seconds)
            with self._lock:
                self._recent.append((time.monotonic(), seconds, not inference_failed))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def window(self, seconds: float) -> dict[str, Any]:
        """Latency percentiles, throughput and errors over the last ``seconds``."""
        since = time.monotonic() - seconds
        with self._lock:
            recent = [(s, ok) for t, s, ok in self._recent if t >= since]
        latencies = sorted(s * 1000 for s, _ in recent)

        def pct(q: float) -> float | None:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None

        return {
            "requests": len(recent),
            "errors": sum(1 for _, ok in recent if not ok),
            "throughput_rps": round(len(recent) / seconds, 3),
            "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)},
        }
