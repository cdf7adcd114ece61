"""Inference over MQTT 5 request/response and periodic telemetry, against a real Mosquitto and agent."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from edge_agent.protocol import Topics
from tests.conftest import AgentProcess, Keys, StateListener
from tests.tinymodel import make_tiny_bundle


class Requester:
    def __init__(self, broker: LocalBroker, topic: str) -> None:
        self.replies: dict[bytes, dict[str, Any]] = {}
        self.telemetry: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.topic = topic
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([("test/replies", 1), (topic.replace("/infer", "/telemetry"), 0)])
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            if msg.topic == "test/replies":
                self.replies[getattr(msg.properties, "CorrelationData", b"")] = json.loads(msg.payload)
            else:
                self.telemetry.append(json.loads(msg.payload))
            self._cond.notify_all()

    def ask(self, body: bytes, correlation: bytes) -> dict[str, Any]:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "test/replies"
        props.CorrelationData = correlation
        self.client.publish(self.topic, body, qos=1, properties=props)
        with self._cond:
            assert self._cond.wait_for(lambda: correlation in self.replies, timeout=10), "no reply"
            return self.replies[correlation]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def wait_telemetry(self, timeout_s: float) -> dict[str, Any]:
        with self._cond:
            assert self._cond.wait_for(lambda: self.telemetry, timeout=timeout_s), "no telemetry"
            return self.telemetry[-1]


def test_mqtt_request_response_and_telemetry(
    tmp_path: Path,
    mosquitto: LocalBroker,
    fleet: str,
    keys: Keys,
    agent_process: Callable[..., AgentProcess],
    state_listener: StateListener,
) -> None:
    make_tiny_bundle(tmp_path / "v1", version=1)
    push_bundle(tmp_path / "v1", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private)
    agent = agent_process()
    config = agent.config_path.read_text() + "\n[serving]\ntelemetry_interval_s = 1\n"
    agent.stop()
    state_listener.wait_for(lambda s: not s["online"])
    seen = len(state_listener.states)
    agent.config_path.write_text(config)
    agent.start()
    agent.wait_version(1)
    # After a restart the installed version serves over HTTP before MQTT connects; a QoS 1
    # request to a topic nobody subscribes to yet is dropped by the broker, so wait for the
    # agent's online state (published after it subscribed) before asking.
    state_listener.wait_for(lambda s: s["online"] and s["active_version"] == 1, since=seen)
    requester = Requester(mosquitto, Topics(fleet=fleet).device_infer("dev-1"))
    try:
        ok = requester.ask(json.dumps({"texts": ["turn on the lights", "switch off"]}).encode(), b"c-1")
        assert ok["status"] == 200
        assert [p["label"] for p in ok["predictions"]] == ["lights_on", "lights_off"]
        assert ok["version"] == 1
        bad = requester.ask(b"{not json", b"c-2")
        assert bad["status"] == 400
        assert "not valid JSON" in bad["error"]
        empty = requester.ask(json.dumps({"texts": []}).encode(), b"c-3")
        assert (empty["status"], empty["error"]) == (400, '"texts" is empty: nothing to classify')

        telemetry = requester.wait_telemetry(5)
        assert telemetry["schema"] == "edgeloop.telemetry/1"
        assert telemetry["active_version"] == 1
        assert telemetry["rss_mb"] > 10
        assert set(telemetry["latency_ms"]) == {"p50", "p95", "p99"}
    finally:
        requester.client.loop_stop()
        requester.client.disconnect()
