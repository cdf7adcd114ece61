"""Telemetry without a broker: the document, its period, and a failing publish, with the publisher
wired to a fake transport (tests/fakemqtt.py) as the agent wires it to MQTT. The same path against
a real Mosquitto and agent process is tests/edge_agent/test_mqtt_inference.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from edge_agent.outbox import OutboxStats
from edge_agent.protocol.telemetry import Telemetry
from edge_agent.serving.metrics import ServingMetrics
from edge_agent.telemetry import TelemetryPublisher
from tests.fakemqtt import FakeTransport

TOPIC = "edgeloop/v1/f/devices/dev-1/telemetry"


def describe() -> tuple[str, str, str, int | None, int]:
    return "dev-1", "f", "intents", 3, 2


@pytest.fixture
def publisher() -> Iterator[Callable[..., TelemetryPublisher]]:
    started: list[TelemetryPublisher] = []

    def make(*, interval_s: float, publish: Callable[[bytes], None], metrics: ServingMetrics | None = None,
             start: bool = True) -> TelemetryPublisher:  # fmt: skip
        made = TelemetryPublisher(
            interval_s=interval_s, metrics=metrics or ServingMetrics(), publish=publish, describe=describe,
            outbox=lambda: OutboxStats(queued=4, bytes=400, dropped=1, uploaded=9),
        )  # fmt: skip
        if start:
            made.start()
            started.append(made)
        return made

    yield make
    for made in started:
        made.stop()


def test_snapshot_summarises_the_window_the_model_and_the_outbox(
    publisher: Callable[..., TelemetryPublisher],
) -> None:
    metrics = ServingMetrics()
    for seconds in (0.010, 0.020, 0.030):
        metrics.observe("predict", 200, seconds)
    metrics.observe("predict", 500, 0.040, inference_failed=True)
    metrics.observe("predict", 400, 0.001)  # the caller's mistake: not a model run
    doc = publisher(interval_s=60, publish=lambda _p: None, metrics=metrics, start=False).snapshot()
    assert (doc.device, doc.fleet, doc.model, doc.active_version, doc.queue_depth) == ("dev-1", "f", "intents", 3, 2)
    assert (doc.requests, doc.errors, doc.window_s) == (4, 1, 60)
    assert doc.latency_ms.p50 is not None and doc.latency_ms.p99 == 40.0
    assert doc.samples is not None
    assert (doc.samples.queued, doc.samples.queued_bytes, doc.samples.dropped, doc.samples.uploaded) == (4, 400, 1, 9)
    assert doc.rss_mb > 0


def test_it_publishes_a_valid_document_every_period(publisher: Callable[..., TelemetryPublisher]) -> None:
    fake = FakeTransport()
    publisher(interval_s=0.01, publish=lambda payload: fake.publish(TOPIC, payload, qos=0))
    sent = fake.wait_sent(lambda s: len(s) >= 3)
    assert {(m.topic, m.qos) for m in sent} == {(TOPIC, 0)}
    docs = [Telemetry.model_validate_json(m.payload) for m in sent]
    assert all(d.device == "dev-1" and d.window_s == 0.01 for d in docs)


def test_a_failed_publish_does_not_end_telemetry(publisher: Callable[..., TelemetryPublisher]) -> None:
    fake = FakeTransport()
    failures = iter([OSError("socket gone"), ValueError("bad")])

    def publish(payload: bytes) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        fake.publish(TOPIC, payload, qos=0)

    publisher(interval_s=0.01, publish=publish)
    fake.wait_sent(lambda s: len(s) >= 2)  # after both failures


def test_stop_ends_the_thread_and_no_interval_means_no_thread(publisher: Callable[..., TelemetryPublisher]) -> None:
    fake = FakeTransport()
    running = publisher(interval_s=0.01, publish=lambda payload: fake.publish(TOPIC, payload, qos=0))
    fake.wait_sent(lambda s: len(s) >= 1)
    running.stop()  # returns once the thread has ended
    assert not running._thread.is_alive()
    off = publisher(interval_s=0, publish=lambda payload: fake.publish(TOPIC, payload, qos=0))
    assert not off._thread.is_alive()  # start() with interval 0 starts nothing
