"""Chunks live under a root of their own: subscribing to `edgeloop/#` after a push pulls the release,
not the model's bytes; `chunks gc --legacy` clears what earlier releases left at the old place."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.chunk_gc import clear_legacy_chunks
from cloud_trainer.releases.publish import push_bundle
from edge_agent.protocol.topics import Topics, chunk_root
from tests.conftest import Keys
from tests.mqttclient import TestClient
from tests.tinymodel import make_tiny_bundle


def _settled(client: TestClient, timeout_s: float = 30.0) -> list[tuple[str, bytes]]:
    """Every message until a probe the client sent itself, after its subscriptions, comes back."""
    probe = f"edgeloop/v1/_probes/{secrets.token_hex(6)}"
    assert client.subscribe(probe) == "Granted QoS 1"
    assert client.publish(probe, b"probe") == "Success"
    client.wait_until(lambda: any(t == probe for t, _p, _props in client.messages), timeout_s=timeout_s)
    return [(t, p) for t, p, _props in client.messages if t != probe]


def test_a_dashboard_on_edgeloop_hash_gets_the_release_and_no_model_bytes(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys
) -> None:
    assert chunk_root("edgeloop/v1") == "edgeloop-chunks/v1" and chunk_root("acme") == "acme-chunks"
    make_tiny_bundle(tmp_path / "v1", version=1, padding=300_000)  # several chunks
    result = push_bundle(tmp_path / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    assert result.chunks > 3
    topics = Topics(fleet=fleet)
    dashboard = TestClient(host=mosquitto.host, port=mosquitto.port, security=None, client_id=f"{fleet}-dash")
    device = TestClient(host=mosquitto.host, port=mosquitto.port, security=None, client_id=f"{fleet}-dev")
    try:
        assert dashboard.subscribe("edgeloop/#") == "Granted QoS 1"
        seen = _settled(dashboard)
        assert topics.fleet_release("intents") in {t for t, _ in seen}
        assert not [t for t, _ in seen if t.startswith(topics.chunk_base)]
        assert sum(len(p) for t, p in seen if t.startswith(topics.base)) < 10_000
        assert device.subscribe(f"{topics.chunk_base}/+") == "Granted QoS 1"
        chunks = [t for t, p in _settled(device) if t.startswith(topics.chunk_base) and p]
        assert len(chunks) == result.chunks  # where the agent fetches them
    finally:
        dashboard.close()
        device.close()


def test_chunks_gc_legacy_clears_the_old_place_only(tmp_path: Path, mosquitto: LocalBroker, fleet: str) -> None:
    topics = Topics(fleet=fleet)
    old = [f"{topics.legacy_chunk_base()}/{secrets.token_hex(32)}" for _ in range(3)]
    publisher = TestClient(host=mosquitto.host, port=mosquitto.port, security=None, client_id=f"{fleet}-old")
    try:
        for topic in old:
            assert publisher.publish(topic, b"old chunk bytes", retain=True) == "Success"
        current = topics.chunk("a" * 64)
        assert publisher.publish(current, b"current chunk", retain=True) == "Success"
    finally:
        publisher.close()
    dry = clear_legacy_chunks(host=mosquitto.host, port=mosquitto.port, fleet=fleet, dry_run=True)
    assert sorted(dry.removed) == sorted(t.rsplit("/", 1)[1] for t in old)
    done = clear_legacy_chunks(host=mosquitto.host, port=mosquitto.port, fleet=fleet)
    assert len(done.removed) == 3 and not done.dry_run
    deadline = time.monotonic() + 10
    while clear_legacy_chunks(host=mosquitto.host, port=mosquitto.port, fleet=fleet, dry_run=True).removed:
        assert time.monotonic() < deadline, "the old chunks are still retained"
    reader = TestClient(host=mosquitto.host, port=mosquitto.port, security=None, client_id=f"{fleet}-read")
    try:
        assert reader.subscribe(current) == "Granted QoS 1"
        reader.wait_message(current)  # the chunk at the new place is untouched
    finally:
        reader.close()
