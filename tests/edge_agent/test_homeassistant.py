"""Home Assistant MQTT discovery from a real agent: the configs it retains, and their templates
rendered (with Jinja2, as Home Assistant does) against the documents the same agent publishes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import jinja2

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from edge_agent.protocol.topics import Topics
from tests.conftest import AgentProcess, Keys
from tests.mqttclient import TestClient
from tests.tinymodel import make_tiny_bundle


def test_discovery_configs_point_at_the_agents_documents_and_their_templates_render(
    tmp_path, mosquitto: LocalBroker, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess]
) -> None:
    topics = Topics(fleet=fleet)
    watcher = TestClient(host=mosquitto.host, port=mosquitto.port, security=None, client_id=f"{fleet}-ha")
    try:
        watcher.subscribe("homeassistant/+/edgeloop_dev-1/+/config")
        watcher.subscribe(f"{topics.base}/devices/dev-1/+")
        make_tiny_bundle(tmp_path / "v1", version=1)
        push_bundle(tmp_path / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
        agent = agent_process(extra_toml="\n[homeassistant]\ndiscovery = true\n[serving]\ntelemetry_interval_s = 0.5\n")
        agent.wait_version(1)
        assert agent.predict(["turn on the lights"])[0] == 200

        def latest() -> dict[str, bytes]:
            return {t: p for t, p, _props in watcher.messages if p}

        def complete() -> bool:
            got = latest()
            configs = [t for t in got if t.startswith("homeassistant/")]
            telemetry = got.get(topics.device_telemetry("dev-1"))
            state = got.get(topics.device_state("dev-1"))
            return (
                len(configs) == 8 and telemetry is not None and json.loads(telemetry)["requests"] > 0
                and state is not None and json.loads(state)["active_version"] == 1
            )  # fmt: skip

        deadline = time.monotonic() + 30
        while not complete():
            assert time.monotonic() < deadline, sorted(latest())
            time.sleep(0.1)
        got = latest()
    finally:
        watcher.close()

    configs = {t: json.loads(p) for t, p in got.items() if t.startswith("homeassistant/")}
    documents = {t: json.loads(p) for t, p in got.items() if not t.startswith("homeassistant/")}
    assert len({c["unique_id"] for c in configs.values()}) == 8
    rendered = {}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)  # a wrong key fails loudly here
    for topic, config in configs.items():
        assert config["state_topic"] in documents, (topic, config["state_topic"])
        assert config["device"]["identifiers"] == [f"edgeloop_dev-1_{fleet}"]
        value = env.from_string(config["value_template"]).render(value_json=documents[config["state_topic"]])
        rendered[config["object_id"]] = value
        if "availability_topic" in config:
            available = env.from_string(config["availability_template"])
            assert available.render(value_json=documents[config["availability_topic"]]) == "online"
    assert rendered["edgeloop_dev-1_online"] == "ON"
    assert rendered["edgeloop_dev-1_model_version"] == "1"
    assert rendered["edgeloop_dev-1_update_state"] == "active"
    assert float(rendered["edgeloop_dev-1_requests_per_s"]) >= 0
    assert float(rendered["edgeloop_dev-1_latency_p50"]) > 0
    assert rendered["edgeloop_dev-1_samples_queued"].isdigit()
