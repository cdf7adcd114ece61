"""Samples from a real agent process through a real Mosquitto into the cloud's store, under faults:
a broker outage, kill -9 with samples queued, a full outbox."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from cloud_trainer.samples.collect import Collector
from cloud_trainer.samples.store import SampleStore
from edge_agent.protocol import Topics
from tests.conftest import AgentProcess, Keys, StateListener
from tests.ports import start_mosquitto
from tests.tinymodel import make_tiny_bundle

SAMPLE_EVERYTHING = """
[sampling]
low_confidence = 0.0
random_rate = 1.0
per_class_per_hour = 100000
per_hour = 100000

[outbox]
upload_interval_s = 0.5
ack_timeout_s = 3
retry_max_s = 1
"""

TEXTS = ["turn on the lights", "switch off", "lights on please", "off now", "on"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of this test's own, with persistence, so it can be stopped and started again."""
    own = start_mosquitto(persistence=True, workdir=tmp_path / "broker")
    try:
        yield own
    finally:
        own.stop()


@pytest.fixture
def collector_for() -> Iterator[Callable[[SampleStore, LocalBroker, str], Collector]]:
    """Starts collectors for the test; every one is stopped at teardown, whatever happened."""
    started: list[Collector] = []

    def start(store: SampleStore, broker: LocalBroker, fleet: str) -> Collector:
        collector = Collector(store=store, fleet=fleet, host=broker.host, port=broker.port,
                              client_id=f"collect-{fleet}")  # fmt: skip
        collector.start()
        started.append(collector)
        return collector

    try:
        yield start
    finally:
        for collector in started:
            collector.stop()


def predict_ids(agent: AgentProcess, texts: list[str]) -> list[str]:
    status, body = agent.predict(texts)
    assert status == 200, body
    return [p["id"] for p in body["predictions"]]


def metric(agent: AgentProcess, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def stored_ids(store: SampleStore) -> set[str]:
    return {s.prediction_id for s in store.query()}


def start_serving(
    tmp_path: Path, broker: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess],
    extra: str = SAMPLE_EVERYTHING,
) -> AgentProcess:  # fmt: skip
    make_tiny_bundle(tmp_path / "v1", version=1)
    push_bundle(tmp_path / "v1", host=broker.host, port=broker.port, fleet=fleet, key_path=keys.private)
    agent = agent_process(broker=broker, extra_toml=extra)
    agent.wait_version(1)
    return agent


def test_broker_outage_then_every_sample_arrives_exactly_once(
    tmp_path: Path, broker: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess],
    collector_for: Callable[[SampleStore, LocalBroker, str], Collector],
) -> None:  # fmt: skip
    store = SampleStore(tmp_path / "store")
    collector = collector_for(store, broker, fleet)
    agent = start_serving(tmp_path, broker, fleet, keys, agent_process)
    before = predict_ids(agent, TEXTS)
    wait_until(lambda: stored_ids(store) >= set(before), "the first samples to arrive")

    broker.stop()
    during: list[str] = []
    for i in range(12):  # the agent keeps serving; samples pile up in its outbox
        during += predict_ids(agent, [f"{TEXTS[i % 5]} {i}", f"lights {i}"])
    wait_until(lambda: metric(agent, "edge_agent_samples_queued") == 24, "24 samples queued in the outbox")
    broker.restart()

    wait_until(lambda: stored_ids(store) >= set(during), "the queued samples to arrive after the outage", 90)
    wait_until(lambda: metric(agent, "edge_agent_samples_queued") == 0, "the outbox to empty")
    # Nothing is left to send again; a probe sample after all of them, on the same connection and
    # topic, arrives after anything sent before it (MQTT keeps their order), so once it is stored,
    # a copy sent twice would be too.
    probe = predict_ids(agent, ["probe: the last one"])
    wait_until(lambda: set(probe) <= stored_ids(store), "the probe sample")
    counts = store.counts()
    print(f"\nstored {counts['samples']} samples from {len(before) + len(during) + 1} predictions; "
          f"collector saw {collector.stats.duplicates} duplicate records")  # fmt: skip
    assert stored_ids(store) == set(before + during + probe)
    assert counts["samples"] == counts["records_received"] == 30
    assert metric(agent, "edge_agent_samples_dropped_total") == 0


def test_kill_9_with_samples_queued_loses_none(
    tmp_path: Path, broker: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess],
    collector_for: Callable[[SampleStore, LocalBroker, str], Collector],
) -> None:  # fmt: skip
    agent = start_serving(tmp_path, broker, fleet, keys, agent_process)
    broker.stop()
    ids: list[str] = []
    for i in range(10):
        ids += predict_ids(agent, [f"turn on light {i}", f"off {i}"])
    wait_until(lambda: metric(agent, "edge_agent_samples_queued") == 20, "20 samples in the outbox")
    assert agent.process is not None
    agent.process.kill()  # kill -9: no chance to flush anything
    agent.process.wait()

    broker.restart()
    store = SampleStore(tmp_path / "store")
    collector_for(store, broker, fleet)
    agent.start()
    wait_until(lambda: stored_ids(store) >= set(ids), "every queued sample after the restart", 90)
    assert stored_ids(store) == set(ids)


def test_full_outbox_drops_the_oldest_counts_and_reports_them(
    tmp_path: Path, broker: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess],
    collector_for: Callable[[SampleStore, LocalBroker, str], Collector],
) -> None:  # fmt: skip
    small = SAMPLE_EVERYTHING.replace("[outbox]\n", "[outbox]\nmax_bytes = 4096\n") + "\n"
    small += "[serving]\ntelemetry_interval_s = 1\n"
    agent = start_serving(tmp_path, broker, fleet, keys, agent_process, extra=small)
    broker.stop()
    ids = []
    for i in range(30):
        ids += predict_ids(agent, [f"turn on the lights number {i}"])
    outbox = ("edge_agent_samples_queued", "edge_agent_samples_dropped_total")
    wait_until(lambda: sum(metric(agent, name) for name in outbox) == 30, "every sample queued or dropped")
    queued = int(metric(agent, "edge_agent_samples_queued"))
    dropped = int(metric(agent, "edge_agent_samples_dropped_total"))
    print(f"\noutbox of 4096 bytes: {queued} samples kept, {dropped} oldest dropped")
    assert dropped > 0 and queued > 0

    broker.restart()
    listener = StateListener(broker, Topics(fleet=fleet).device_telemetry("dev-1"))  # any JSON topic
    try:
        store = SampleStore(tmp_path / "store")
        collector_for(store, broker, fleet)
        wait_until(lambda: len(stored_ids(store)) >= queued, "the kept samples to arrive", 90)
        assert stored_ids(store) == set(ids[-queued:])  # the newest survived, the oldest were dropped
        report = listener.wait_for(lambda t: t.get("samples", {}).get("queued") == 0, 60)
        assert report["samples"]["dropped"] == dropped
        assert report["samples"]["uploaded"] == queued
    finally:
        listener.close()


def test_samples_wait_on_the_device_until_a_collector_subscribes(
    tmp_path: Path, broker: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess],
    collector_for: Callable[[SampleStore, LocalBroker, str], Collector],
) -> None:  # fmt: skip
    """The broker answers a batch nobody subscribes to with PUBACK "no matching subscribers" and drops
    it; the agent keeps such batches in its outbox and sends them again once a collector is there."""
    agent = start_serving(tmp_path, broker, fleet, keys, agent_process)
    ids = predict_ids(agent, TEXTS)
    refused = r"broker did not take a batch of \d+ samples \(No matching subscribers\)"
    agent.wait_log(refused, count=2)  # two upload attempts, each refused
    assert metric(agent, "edge_agent_samples_queued") == len(TEXTS)
    assert metric(agent, "edge_agent_samples_uploaded_total") == 0
    store = SampleStore(tmp_path / "store", collector=True)
    collector_for(store, broker, fleet)
    wait_until(lambda: stored_ids(store) == set(ids), "the kept samples after the collector subscribed", 90)
