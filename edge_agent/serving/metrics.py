"""Serving metrics: the Prometheus registry behind ``/metrics``, and a rolling window of latencies
for the periodic MQTT telemetry."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent import __version__
from edge_agent.protocol.state import UpdateState

if TYPE_CHECKING:
    from edge_agent.outbox import OutboxStats

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UPDATE_STATES: tuple[str, ...] = get_args(UpdateState)


class ServingMetrics:
    """One registry per agent (so tests can run several in a process).

    Besides the request metrics it holds the process and platform collectors
    (``process_resident_memory_bytes``, ``process_open_fds``, ``python_info``, ...) and
    ``edge_agent_build_info{version}``. The composition root feeds it the rest::

        metrics.track_outbox(outbox.stats)              # edge_agent_samples_* (read at scrape)
        metrics.track_mqtt(transport_is_connected)      # edge_agent_mqtt_connected (read at scrape)
        metrics.set_update_state("downloading")         # edge_agent_update_state{state} at each change
        metrics.set_model("intents", 3, "int8", ["CPUExecutionProvider"])  # edge_agent_model_info, per activation

    Until a ``track_*`` or ``set_*`` call the metric it feeds is absent from the exposition (no
    made-up values); ``set_model(name, None, None, None)`` says no model serves (labels "none").
    """

    def __init__(self, *, window: int = 4096) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("edge_agent_build", "The agent's build", registry=self.registry).info({"version": __version__})
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
        self._state = _AgentState()
        self.registry.register(self._state)
        self._request_series: dict[tuple[str, int], Counter] = {}
        self._latency_series: dict[str, Histogram] = {}
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, float, bool]] = deque(maxlen=window)  # (time, seconds, ok)

    def track_outbox(self, stats: Callable[[], OutboxStats]) -> None:
        """Expose the sample outbox's counts, read at scrape time: ``edge_agent_samples_queued``
        and ``..._queued_bytes`` (gauges), ``edge_agent_samples_dropped_total`` and
        ``..._uploaded_total`` (counters). A second call replaces the first."""
        self._state.outbox = stats

    def track_mqtt(self, connected: Callable[[], bool]) -> None:
        """Expose ``edge_agent_mqtt_connected`` (1 or 0), read at scrape time; must not block or raise."""
        self._state.mqtt_connected = connected

    def set_update_state(self, state: str) -> None:
        """The updater's state now: ``edge_agent_update_state{state}`` is 1 for it, 0 for the others."""
        if state not in UPDATE_STATES:
            raise ValueError(f"unknown update state {state!r}; one of {', '.join(UPDATE_STATES)}")
        self._state.update_state = state

    def set_model(self, model: str, version: int | None, quantization: str | None, providers: list[str] | None) -> None:
        """The model serving now (replaces the previous one): ``edge_agent_model_info{model, version,
        quantization, providers}`` 1; absent values are "none", providers comma-separated in order."""
        self._state.model = {
            "model": model,
            "version": "none" if version is None else str(version),
            "quantization": quantization or "none",
            "providers": ",".join(providers) if providers else "none",
        }

    def observe(self, endpoint: str, code: int, seconds: float, *, inference_failed: bool = False) -> None:
        counter = self._request_series.get((endpoint, code))
        if counter is None:  # prometheus-client's labels() is a lookup under a lock: once per series
            counter = self._request_series[(endpoint, code)] = self.requests.labels(endpoint=endpoint, code=str(code))
        counter.inc()
        if inference_failed:
            self.inference_errors.inc()
        if code < 400 or inference_failed:
            histogram = self._latency_series.get(endpoint)
            if histogram is None:
                histogram = self._latency_series[endpoint] = self.latency.labels(endpoint=endpoint)
            histogram.observe(seconds)
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


class _AgentState(Collector):
    """The agent's state, read or held between scrapes; each attribute is replaced whole (atomic)."""

    def __init__(self) -> None:
        self.outbox: Callable[[], OutboxStats] | None = None
        self.mqtt_connected: Callable[[], bool] | None = None
        self.update_state: str | None = None
        self.model: dict[str, str] | None = None

    def describe(self) -> Iterator[Metric]:  # the names, for the registry's duplicate check
        yield from self._outbox(None)
        yield GaugeMetricFamily("edge_agent_mqtt_connected", "")
        yield GaugeMetricFamily("edge_agent_update_state", "", labels=["state"])
        yield InfoMetricFamily("edge_agent_model", "")

    def collect(self) -> Iterator[Metric]:
        outbox, connected, state, model = self.outbox, self.mqtt_connected, self.update_state, self.model
        if outbox is not None:
            yield from self._outbox(outbox())
        if connected is not None:
            yield GaugeMetricFamily(
                "edge_agent_mqtt_connected", "1 while the agent is connected to the MQTT broker", value=int(connected())
            )
        if state is not None:
            family = GaugeMetricFamily(
                "edge_agent_update_state", "The model updater's state (1 for the current one)", labels=["state"]
            )
            for name in UPDATE_STATES:
                family.add_metric([name], int(name == state))
            yield family
        if model is not None:
            yield InfoMetricFamily("edge_agent_model", "The model serving", value=model)

    @staticmethod
    def _outbox(stats: OutboxStats | None) -> Iterator[Metric]:
        def value(field: str) -> float | None:
            return None if stats is None else float(getattr(stats, field))

        yield GaugeMetricFamily(
            "edge_agent_samples_queued", "Samples waiting in the outbox for upload", value=value("queued")
        )
        yield GaugeMetricFamily(
            "edge_agent_samples_queued_bytes", "Bytes of samples waiting in the outbox", value=value("bytes")
        )
        yield CounterMetricFamily(
            "edge_agent_samples_dropped", "Samples dropped because the outbox or disk was full", value=value("dropped")
        )
        yield CounterMetricFamily(
            "edge_agent_samples_uploaded", "Samples acknowledged by the broker", value=value("uploaded")
        )
