"""The MQTT seam: a small wrapper around paho-mqtt (MQTT 5).

It keeps the subscriptions and renews them after every reconnect, guards the network thread
against handler exceptions, and translates paho's errors into :class:`TransportError`. Handlers
run on paho's network thread: they must be quick and hand long work to another thread.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.mqtt_security import MqttSecurity

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes, bool], None]
"""``handler(topic, payload, retained)``"""

RequestHandler = Callable[[bytes, str | None, bytes | None], None]
"""``handler(payload, response_topic, correlation_data)`` for MQTT 5 request/response"""


_NO_MATCHING_SUBSCRIBERS = 0x10


class TransportError(Exception):
    """The broker cannot be reached, or refused an operation."""


def protocol_version(name: str) -> MQTTProtocolVersion:
    versions = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
    if name not in versions:
        raise ValueError(f"MQTT protocol {name!r} is not one of {', '.join(versions)}")
    return versions[name]


class MqttTransport:
    """One MQTT 5 connection.

    Args:
        host: broker host.
        port: broker port.
        client_id: MQTT client id; unique per device.
        keepalive_s: keepalive interval.
        protocol: ``"5"`` or ``"3.1.1"``.
        will: ``(topic, payload)`` published retained by the broker if this client vanishes.
        security: TLS and credentials (:class:`MqttSecurity`); plain TCP without credentials if ``None``.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        keepalive_s: int = 30,
        protocol: str = "5",
        will: tuple[str, bytes] | None = None,
        security: MqttSecurity | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.keepalive_s = keepalive_s
        self.connected = threading.Event()
        self._subs: dict[str, int] = {}
        self._connect_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol_version(protocol),
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.max_queued_messages_set(10_000)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        if security is not None:
            security.apply(self._client)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_unrouted
        self._client.on_publish = self._on_publish
        self._refusals: OrderedDict[int, str] = OrderedDict()  # mid -> why the broker did not take it

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, *, wait_s: float = 0.0) -> bool:
        """Connect in the background (reconnecting forever); wait up to ``wait_s`` for the first CONNACK."""
        try:
            self._client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to MQTT broker {self.host}:{self.port}: {exc}") from None
        self._client.loop_start()
        return self.connected.wait(wait_s) if wait_s > 0 else self.connected.is_set()

    def stop(self) -> None:
        self.connected.clear()  # a deliberate disconnect: nothing to warn about
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (on the network thread) after every successful connect."""
        self._connect_hooks.append(hook)

    # -- pub/sub ----------------------------------------------------------------------------------
    def subscribe(self, topic: str, handler: Handler, *, qos: int = 1) -> None:
        """Route messages matching ``topic`` (wildcards allowed) to ``handler``, now and after reconnects."""

        def route(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            try:
                handler(message.topic, bytes(message.payload), bool(message.retain))
            except Exception:
                log.exception("handler for %s failed", message.topic)

        self._add_route(topic, route, qos)

    def _add_route(self, topic: str, callback: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None], qos: int) -> None:
        with self._lock:
            self._subs[topic] = qos
        self._client.message_callback_add(topic, callback)
        if self.connected.is_set():
            self._client.subscribe(topic, qos=qos)

    def subscribe_requests(self, topic: str, handler: RequestHandler, *, qos: int = 1) -> None:
        """Like :meth:`subscribe`, for MQTT 5 requests: the handler gets the response topic and correlation data."""

        def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            props = message.properties
            response_topic = getattr(props, "ResponseTopic", None) if props else None
            correlation = getattr(props, "CorrelationData", None) if props else None
            try:
                handler(bytes(message.payload), response_topic, correlation)
            except Exception:
                log.exception("request handler for %s failed", message.topic)

        self._add_route(topic, on_message, qos)

    def publish_response(self, topic: str, payload: bytes, *, correlation_data: bytes | None) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation_data is not None:
            props.CorrelationData = correlation_data
        props.ContentType = "application/json"
        self._client.publish(topic, payload, qos=1, properties=props)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.pop(topic, None)
        self._client.message_callback_remove(topic)
        if self.connected.is_set():
            self._client.unsubscribe(topic)

    def refusal(self, mid: int) -> str | None:
        """Why the broker's PUBACK for message ``mid`` did not take it (MQTT 5 reason code), or None.

        paho marks a message published on any PUBACK; an ACL refusal (0x87), a quota (0x97) or "no
        matching subscribers" (0x10: nobody would get it) come back here instead.
        """
        with self._lock:
            return self._refusals.pop(mid, None)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any) -> None:
        if reason.is_failure or reason.value == _NO_MATCHING_SUBSCRIBERS:
            with self._lock:
                self._refusals[mid] = str(reason)
                while len(self._refusals) > 1000:  # telemetry nobody subscribes to lands here too
                    self._refusals.popitem(last=False)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info

    # -- paho callbacks ---------------------------------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Properties | None
    ) -> None:
        if reason.is_failure:
            log.warning("broker %s:%s refused the connection: %s", self.host, self.port, reason)
            return
        with self._lock:
            subs = list(self._subs.items())
        if subs:
            client.subscribe(subs)
        log.info("connected to MQTT broker %s:%s", self.host, self.port)
        self.connected.set()
        for hook in self._connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("connect hook failed")

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Properties | None
    ) -> None:
        if self.connected.is_set():
            log.warning("disconnected from MQTT broker (%s); reconnecting", reason)
        self.connected.clear()

    @staticmethod
    def _on_unrouted(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        log.debug("message on %s matched no handler", message.topic)
