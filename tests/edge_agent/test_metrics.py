"""``/metrics`` as Prometheus reads it: the exposition parsed by prometheus_client's text parser."""

from __future__ import annotations

import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import edge_agent
from edge_agent.outbox import OutboxStats
from edge_agent.serving.metrics import UPDATE_STATES, ServingMetrics


def scrape(metrics: ServingMetrics) -> dict[str, tuple[str, list[Sample]]]:
    """Each family's name (as the parser gives it: counters without ``_total``) -> type, samples."""
    text = metrics.exposition().decode()
    return {family.name: (family.type, family.samples) for family in text_string_to_metric_families(text)}


def value(families: dict[str, tuple[str, list[Sample]]], family: str, sample: str, **labels: str) -> float:
    _, samples = families[family]
    (hit,) = [s.value for s in samples if s.name == sample and s.labels == labels]
    return hit


def test_sample_counts_are_counters_read_at_scrape_time_and_queue_sizes_gauges() -> None:
    metrics = ServingMetrics()
    stats = OutboxStats(queued=3, bytes=1200, dropped=7, uploaded=40)
    metrics.track_outbox(lambda: stats)
    families = scrape(metrics)
    assert families["edge_agent_samples_dropped"][0] == "counter"
    assert families["edge_agent_samples_uploaded"][0] == "counter"
    assert value(families, "edge_agent_samples_dropped", "edge_agent_samples_dropped_total") == 7
    assert value(families, "edge_agent_samples_uploaded", "edge_agent_samples_uploaded_total") == 40
    assert families["edge_agent_samples_queued"][0] == "gauge"
    assert families["edge_agent_samples_queued_bytes"][0] == "gauge"
    assert value(families, "edge_agent_samples_queued", "edge_agent_samples_queued") == 3
    assert value(families, "edge_agent_samples_queued_bytes", "edge_agent_samples_queued_bytes") == 1200
    stats = OutboxStats(queued=0, bytes=0, dropped=9, uploaded=43)  # read again at the next scrape
    families = scrape(metrics)
    assert value(families, "edge_agent_samples_uploaded", "edge_agent_samples_uploaded_total") == 43
    assert value(families, "edge_agent_samples_queued", "edge_agent_samples_queued") == 0


def test_request_metrics_have_their_types() -> None:
    metrics = ServingMetrics()
    metrics.observe("predict", 200, 0.004)
    metrics.observe("predict", 500, 0.2, inference_failed=True)
    metrics.batch_size.observe(4)
    families = scrape(metrics)
    types = {name: families[name][0] for name in (
        "edge_agent_requests", "edge_agent_inference_errors", "edge_agent_request_latency_seconds",
        "edge_agent_batch_size", "edge_agent_queue_depth", "edge_agent_active_version",
    )}  # fmt: skip
    assert types == {
        "edge_agent_requests": "counter",
        "edge_agent_inference_errors": "counter",
        "edge_agent_request_latency_seconds": "histogram",
        "edge_agent_batch_size": "histogram",
        "edge_agent_queue_depth": "gauge",
        "edge_agent_active_version": "gauge",
    }
    assert value(families, "edge_agent_requests", "edge_agent_requests_total", endpoint="predict", code="500") == 1
    assert value(families, "edge_agent_inference_errors", "edge_agent_inference_errors_total") == 1
    latency = "edge_agent_request_latency_seconds"
    assert value(families, latency, f"{latency}_count", endpoint="predict") == 2


@pytest.mark.skipif(sys.platform != "linux", reason="the process collector reads /proc")
def test_process_and_platform_metrics_are_on_the_agents_registry() -> None:
    families = scrape(ServingMetrics())
    for name in ("process_open_fds", "process_resident_memory_bytes", "process_start_time_seconds"):
        assert families[name][0] == "gauge"
        assert value(families, name, name) > 0
    assert families["process_cpu_seconds"][0] == "counter"
    assert families["python_info"][0] == "gauge"


def test_build_and_model_info() -> None:
    metrics = ServingMetrics()
    families = scrape(metrics)
    assert families["edge_agent_build_info"][0] == "gauge"
    assert value(families, "edge_agent_build_info", "edge_agent_build_info", version=edge_agent.__version__) == 1
    assert "edge_agent_model_info" not in families  # no model yet: nothing made up
    metrics.set_model("intents", None, None, None)
    none = {"model": "intents", "version": "none", "quantization": "none", "providers": "none"}
    assert value(scrape(metrics), "edge_agent_model_info", "edge_agent_model_info", **none) == 1
    metrics.set_model("intents", 3, "int8", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    _, samples = scrape(metrics)["edge_agent_model_info"]
    assert [(s.labels, s.value) for s in samples] == [  # the new label set replaces the old one
        ({"model": "intents", "version": "3", "quantization": "int8",
          "providers": "CUDAExecutionProvider,CPUExecutionProvider"}, 1.0),
    ]  # fmt: skip


def test_mqtt_connection_is_read_at_scrape_time() -> None:
    metrics = ServingMetrics()
    assert "edge_agent_mqtt_connected" not in scrape(metrics)
    connected = [False]
    metrics.track_mqtt(lambda: connected[0])
    families = scrape(metrics)
    assert families["edge_agent_mqtt_connected"][0] == "gauge"
    assert value(families, "edge_agent_mqtt_connected", "edge_agent_mqtt_connected") == 0
    connected[0] = True
    assert value(scrape(metrics), "edge_agent_mqtt_connected", "edge_agent_mqtt_connected") == 1


def test_update_state_is_one_for_the_current_state_and_zero_for_every_other() -> None:
    metrics = ServingMetrics()
    assert "edge_agent_update_state" not in scrape(metrics)
    for current in ("downloading", "active"):
        metrics.set_update_state(current)
        kind, samples = scrape(metrics)["edge_agent_update_state"]
        assert kind == "gauge"
        assert {s.labels["state"]: s.value for s in samples} == {s: float(s == current) for s in UPDATE_STATES}
    assert set(UPDATE_STATES) >= {"idle", "downloading", "verifying", "staged", "active", "rolled-back"}
    with pytest.raises(ValueError, match="unknown update state 'sleeping'"):
        metrics.set_update_state("sleeping")


def test_two_agents_in_one_process_have_their_own_registries() -> None:
    first, second = ServingMetrics(), ServingMetrics()
    first.set_update_state("staged")
    first.observe("predict", 200, 0.001)
    assert "edge_agent_update_state" not in scrape(second)
    assert scrape(second)["edge_agent_requests"][1] == []
