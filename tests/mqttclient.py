"""A small synchronous MQTT 5 test client that reports what the broker said: CONNACK, PUBACK, SUBACK."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.mqtt_security import MqttSecurity


class TestClient:
    """Connects at construction; :attr:`accepted` says whether the broker let it in, :attr:`refusal` why not."""

    __test__ = False  # not a test class

    def __init__(self, *, host: str, port: int, security: MqttSecurity | None, client_id: str) -> None:
        self.accepted = False
        self.refusal = ""
        self.messages: list[tuple[str, bytes, Any]] = []
        self._cond = threading.Condition()
        self._acks: dict[int, str] = {}
        self._answered = threading.Event()
        self.dropped = threading.Event()  # the broker closed an accepted connection
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(min_delay=60, max_delay=60)  # one try is the whole test
        if security is not None:
            security.apply(self.client)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        try:
            self.client.connect(host, port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self.refusal = f"connect failed: {exc}"
            return
        self.client.loop_start()
        if not self._answered.wait(10):
            self.refusal = "no CONNACK within 10 s"
        if not self.accepted:
            self.close()

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.refusal = f"CONNACK {reason}"
        else:
            self.accepted = True
        self._answered.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not self._answered.is_set():
            self.refusal = f"closed before CONNACK: {reason}"
            self._answered.set()
        elif self.accepted:
            self.dropped.set()

    def _on_ack(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._cond:  # "No matching subscribers" is a success too
            self._acks[mid] = str(reason) if reason.is_failure else "Success"
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        with self._cond:
            self._acks[mid] = str(reasons[0])
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), msg.properties))
            self._cond.notify_all()

    def _wait_ack(self, mid: int) -> str:
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, timeout=10), "the broker did not acknowledge"
            return self._acks[mid]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, properties: Properties | None = None) -> str:
        """Publish at QoS 1; "Success" when the broker took it, else the PUBACK's reason ("Not authorized")."""
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        return self._wait_ack(info.mid)

    def subscribe(self, topic: str) -> str:
        """Subscribe at QoS 1; the SUBACK's reason ("Granted QoS 1", "Not authorized", ...)."""
        _rc, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        return self._wait_ack(mid)

    def wait_message(self, topic: str, timeout_s: float = 30) -> tuple[bytes, Any]:
        with self._cond:
            found: list[tuple[bytes, Any]] = []

            def match() -> bool:
                found[:] = [(p, props) for t, p, props in self.messages if t == topic][-1:]
                return bool(found)

            assert self._cond.wait_for(match, timeout=timeout_s), f"nothing on {topic}; got {self.messages[-5:]}"
            return found[0]

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 30) -> None:
        """Wait until ``predicate`` (which may read :attr:`messages`) holds."""
        with self._cond:
            assert self._cond.wait_for(predicate, timeout=timeout_s), f"not reached; got {self.messages[-5:]}"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def request_properties(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props
