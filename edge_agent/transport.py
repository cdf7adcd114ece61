"""The MQTT seam: the project's one wrapper around paho-mqtt (MQTT 5 or 3.1.1).

Everything that speaks MQTT goes through :class:`MqttTransport`: the agent (releases, chunks,
state, telemetry, samples, inference), the cloud's publisher (``cloud-train push``) and the sample
collector. It

- sets TCP_NODELAY on every socket it opens, so a small reply never waits for a delayed ACK;
- keeps the subscriptions and renews them after every reconnect, with no window in which a
  subscription added during a (re)connect is lost;
- checks every return code and every SUBACK reason: a refused subscription is an immediate,
  named error (logged, kept in :meth:`subscription_error`, handed to the subscriber's
  ``on_refused``) instead of a silent wait;
- records a PUBACK's failure reason (:meth:`refusal`);
- guards the network thread against handler exceptions and turns paho's errors into
  :class:`TransportError`.

Handlers run on paho's network thread: they must be quick and hand long work (disk writes,
inference) to another thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
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

MessageHandler = Callable[[mqtt.MQTTMessage], None]
"""``handler(message)``: the raw paho message (properties, mid for a manual acknowledgement)"""

RequestHandler = Callable[[bytes, str | None, bytes | None], None]
"""``handler(payload, response_topic, correlation_data)`` for MQTT 5 request/response"""

RefusedHandler = Callable[[str, str], None]
"""``on_refused(topic, reason)``: the broker refused a subscription (SUBACK failure)"""

NO_MATCHING_SUBSCRIBERS = 0x10


class TransportError(Exception):
    """The broker cannot be reached, or refused an operation."""


def protocol_version(name: str) -> MQTTProtocolVersion:
    versions = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
    if name not in versions:
        raise ValueError(f"MQTT protocol {name!r} is not one of {', '.join(versions)}")
    return versions[name]


def set_nodelay(sock: Any) -> None:
    """TCP_NODELAY on an MQTT socket (plain or TLS); a no-op on anything that is not TCP."""
    with contextlib.suppress(OSError, AttributeError):  # a websocket wrapper or a unix socket has none
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def filter_problem(topic_filter: str) -> str | None:
    """What makes ``topic_filter`` invalid under MQTT's rules, or None."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2] or "+" in parts[1] or "#" in parts[1]:
            return "a shared subscription is $share/<group>/<filter>"
    levels = _delivered_as(topic_filter).split("/")
    if not topic_filter or len(topic_filter.encode()) > 65535 or "\x00" in topic_filter:
        return "empty, NUL or over 65535 bytes"
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "'#' must be a whole level, the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def _delivered_as(topic_filter: str) -> str:
    """The filter messages of a subscription arrive under: a shared one (``$share/<group>/<filter>``)
    delivers on topics matching ``<filter>``."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class MqttTransport:
    """One MQTT connection.

    Args:
        host: broker host.
        port: broker port.
        client_id: MQTT client id; unique per connection the broker should tell apart.
        keepalive_s: keepalive interval.
        protocol: ``"5"`` or ``"3.1.1"``.
        will: ``(topic, payload)`` published retained by the broker if this client vanishes; the
            payload may be a function, called before every connect attempt (a fresh timestamp).
        security: TLS and credentials (:class:`MqttSecurity`); plain TCP without credentials if ``None``.
        persistent_session: keep the broker-side session (and what is queued for it) across
            disconnects: ``clean_start`` false, with ``session_expiry_s`` on MQTT 5.
        session_expiry_s: MQTT 5 session expiry for a persistent session.
        manual_ack: acknowledge QoS 1 messages only when :meth:`ack` is called.
        max_inflight: QoS 1 messages in flight at once.
        max_packet_bytes: MQTT 5 Maximum Packet Size: the broker sends nothing larger (it never
            reaches memory here); 0 for no limit.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        keepalive_s: int = 30,
        protocol: str = "5",
        will: tuple[str, bytes | Callable[[], bytes]] | None = None,
        security: MqttSecurity | None = None,
        persistent_session: bool = False,
        session_expiry_s: int = 0,
        manual_ack: bool = False,
        max_inflight: int = 20,
        max_packet_bytes: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self.keepalive_s = keepalive_s
        self.connected = threading.Event()
        self._protocol = protocol
        self._persistent = persistent_session
        self._session_expiry_s = session_expiry_s
        self._max_packet_bytes = max_packet_bytes
        self._lock = threading.Lock()
        self._suback = threading.Condition(self._lock)
        self._granted: set[str] = set()  # topics whose latest SUBACK granted them
        self._is_connected = False  # guarded by _lock: subscribe() and _on_connect() agree on it
        self._subs: dict[str, int] = {}
        self._refused_handlers: dict[str, RefusedHandler] = {}
        self._sub_errors: dict[str, str] = {}
        self._pending_subacks: dict[int, list[str]] = {}
        self._connect_hooks: list[Callable[[], None]] = []
        self._connect_refusal: str | None = None
        self.broker_max_packet: int | None = None  # MQTT 5 CONNACK Maximum Packet Size, when the broker sets one
        self._answered = threading.Event()  # a CONNACK (either way) or a close before one
        self._refusals: OrderedDict[int, ReasonCode] = OrderedDict()  # mid -> PUBACK reason that did not take it
        version = protocol_version(protocol)
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=version,
            clean_session=(not persistent_session) if version == MQTTProtocolVersion.MQTTv311 else None,
            manual_ack=manual_ack,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.max_queued_messages_set(10_000)
        self._client.max_inflight_messages_set(max_inflight)
        if will is not None:
            will_topic, will_payload = will
            if callable(will_payload):
                make = will_payload
                self._client.on_pre_connect = lambda _c, _u: self._client.will_set(
                    will_topic, make(), qos=1, retain=True
                )
                will_payload = make()
            self._client.will_set(will_topic, will_payload, qos=1, retain=True)
        if security is not None:
            security.apply(self._client)
        self._client.on_socket_open = lambda _c, _u, sock: set_nodelay(sock)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_unrouted
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe

    # -- lifecycle --------------------------------------------------------------------------------
    def _connect_kwargs(self) -> dict[str, Any]:
        if self._protocol != "5":
            return {}
        kwargs: dict[str, Any] = {"clean_start": not self._persistent}
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self._persistent and self._session_expiry_s:
            props.SessionExpiryInterval = self._session_expiry_s
        if self._max_packet_bytes:
            props.MaximumPacketSize = self._max_packet_bytes
        if not props.isEmpty():  # type: ignore[no-untyped-call]
            kwargs["properties"] = props
        return kwargs

    def start(self, *, wait_s: float = 0.0) -> bool:
        """Connect in the background (reconnecting forever); wait up to ``wait_s`` for the first CONNACK."""
        try:
            self._client.connect_async(self.host, self.port, keepalive=self.keepalive_s, **self._connect_kwargs())
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to MQTT broker {self.host}:{self.port}: {exc}") from None
        self._client.loop_start()
        return self.connected.wait(wait_s) if wait_s > 0 else self.connected.is_set()

    def connect(self, *, timeout_s: float = 10.0) -> None:
        """Connect now and wait for the broker to accept; raise :class:`TransportError` naming why not.

        For short-lived clients (publishing, collecting): a wrong address, a TLS failure, refused
        credentials and a silent broker each give their own message.
        """
        try:
            self._client.connect(self.host, self.port, keepalive=self.keepalive_s, **self._connect_kwargs())
        except ssl.SSLError as exc:
            raise TransportError(f"TLS with MQTT broker {self.host}:{self.port} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise TransportError(f"cannot reach MQTT broker {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._client.loop_start()
        if not self._answered.wait(timeout_s):
            self._shutdown()
            raise TransportError(f"MQTT broker {self.host}:{self.port} did not answer within {timeout_s:g}s")
        if self._connect_refusal is not None:
            self._shutdown()
            raise TransportError(f"MQTT broker {self.host}:{self.port} refused the connection: {self._connect_refusal}")

    def stop(self, *, properties: Properties | None = None) -> None:
        """Disconnect (cleanly: no last will) and stop the network thread."""
        with self._lock:
            self._is_connected = False
        self.connected.clear()  # a deliberate disconnect: nothing to warn about
        self._client.disconnect(properties=properties)
        self._client.loop_stop()

    def _shutdown(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (on the network thread) after every successful connect."""
        self._connect_hooks.append(hook)

    # -- subscriptions ----------------------------------------------------------------------------
    def subscribe(
        self, topic: str, handler: Handler, *, qos: int = 1, on_refused: RefusedHandler | None = None
    ) -> None:
        """Route messages matching ``topic`` (wildcards allowed) to ``handler``, now and after reconnects.

        If the broker refuses the subscription, ``on_refused(topic, reason)`` is called (on the
        network thread) and :meth:`subscription_error` returns the reason.
        """

        def route(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            handler(message.topic, bytes(message.payload), bool(message.retain))

        self._add_route(topic, route, qos, on_refused)

    def subscribe_messages(
        self, topic: str, handler: MessageHandler, *, qos: int = 1, on_refused: RefusedHandler | None = None
    ) -> None:
        """Like :meth:`subscribe`, with the raw message (MQTT 5 properties, ``mid`` for :meth:`ack`)."""
        self._add_route(topic, lambda _c, _u, message: handler(message), qos, on_refused)

    def subscribe_requests(self, topic: str, handler: RequestHandler, *, qos: int = 1) -> None:
        """Like :meth:`subscribe`, for MQTT 5 requests: the handler gets the response topic and correlation data."""

        def on_message(message: mqtt.MQTTMessage) -> None:
            props = message.properties
            response_topic = getattr(props, "ResponseTopic", None) if props else None
            correlation = getattr(props, "CorrelationData", None) if props else None
            handler(bytes(message.payload), response_topic, correlation)

        self.subscribe_messages(topic, on_message, qos=qos)

    def _add_route(
        self,
        topic: str,
        callback: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None],
        qos: int,
        on_refused: RefusedHandler | None,
    ) -> None:
        problem = filter_problem(topic)
        if problem is not None:  # checked here: paho would raise it on its network thread at the next connect
            raise TransportError(f"{topic!r} is not a valid MQTT topic filter: {problem}")

        def guarded(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            try:
                callback(client, userdata, message)
            except Exception:
                log.exception("handler for %s failed", message.topic)

        self._client.message_callback_add(_delivered_as(topic), guarded)
        with self._lock:
            self._subs[topic] = qos
            self._sub_errors.pop(topic, None)
            self._granted.discard(topic)
            if on_refused is not None:
                self._refused_handlers[topic] = on_refused
            else:
                self._refused_handlers.pop(topic, None)
            # Decided under the lock _on_connect takes: either its snapshot holds this topic or
            # we see the connection and subscribe ourselves. Subscribing twice is harmless.
            calls = self._send_subscribe([(topic, qos)]) if self._is_connected else []
        self._run_calls(calls)

    def _send_subscribe(self, subs: list[tuple[str, int]]) -> list[Callable[[], None]]:
        """SUBSCRIBE, remembering which topics the SUBACK answers; call with ``_lock`` held and run
        the returned calls (refusal handlers) after releasing it."""
        try:
            rc, mid = self._client.subscribe(subs)
        except ValueError as exc:  # checked in _add_route; never let it reach paho's network thread
            rc, mid = mqtt.MQTT_ERR_INVAL, None
            log.error("paho refused a subscription: %s", exc)
        if rc == mqtt.MQTT_ERR_NO_CONN:
            return []  # renewed by _on_connect
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            reason = mqtt.error_string(rc)
            calls = [self._note_refusal(topic, f"subscribe failed: {reason}") for topic, _qos in subs]
            self._suback.notify_all()
            return [call for call in calls if call is not None]
        self._pending_subacks[mid] = [topic for topic, _qos in subs]
        return []

    @staticmethod
    def _run_calls(calls: list[Callable[[], None]]) -> None:
        for call in calls:
            try:
                call()
            except Exception:
                log.exception("subscription refusal handler failed")

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.pop(topic, None)
            self._refused_handlers.pop(topic, None)
            self._sub_errors.pop(topic, None)
            self._granted.discard(topic)
            if self._is_connected:
                self._client.unsubscribe(topic)
        self._client.message_callback_remove(_delivered_as(topic))

    def wait_subscribed(self, topic: str, *, timeout_s: float) -> None:
        """Wait for the broker to grant ``topic``; raise :class:`TransportError` if it refuses or is silent."""
        deadline = time.monotonic() + timeout_s
        with self._suback:
            while topic not in self._granted:
                if topic in self._sub_errors:
                    raise TransportError(f"the broker refused the subscription to {topic}: {self._sub_errors[topic]}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(f"the broker did not confirm the subscription to {topic} in {timeout_s:g}s")
                self._suback.wait(remaining)

    def subscription_error(self, topic: str) -> str | None:
        """Why the broker refused the subscription to ``topic`` (None if it did not, or not yet)."""
        with self._lock:
            return self._sub_errors.get(topic)

    def _note_refusal(self, topic: str, reason: str) -> Callable[[], None] | None:
        """Record a refused subscription (``_lock`` held); return the call that tells its subscriber."""
        self._sub_errors[topic] = reason
        log.error("MQTT broker %s:%s refused the subscription to %s: %s", self.host, self.port, topic, reason)
        handler = self._refused_handlers.get(topic)
        if handler is None:
            return None
        return lambda: handler(topic, reason)

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reasons: list[ReasonCode], _props: Any
    ) -> None:
        calls: list[Callable[[], None]] = []
        with self._lock:
            topics = self._pending_subacks.pop(mid, [])
            for topic, reason in zip(topics, reasons, strict=False):
                if topic not in self._subs:
                    continue
                if not reason.is_failure:
                    self._granted.add(topic)
                    continue
                call = self._note_refusal(topic, str(reason))
                if call is not None:
                    calls.append(call)
            self._suback.notify_all()
        self._run_calls(calls)

    # -- publishing -------------------------------------------------------------------------------
    def max_payload(self, topic: str, default: int) -> int:
        """The largest payload the broker takes on ``topic`` (its CONNACK Maximum Packet Size less
        the PUBLISH header), at most ``default``."""
        if self.broker_max_packet is None:
            return default
        return max(0, min(default, self.broker_max_packet - len(topic.encode()) - 64))

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, properties: Properties | None = None
    ) -> mqtt.MQTTMessageInfo:
        """Queue a message; a message that cannot even be queued raises :class:`TransportError`.

        While disconnected a QoS 1 message is queued and sent after the reconnect.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info

    def publish_response(self, topic: str, payload: bytes, *, correlation_data: bytes | None) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation_data is not None:
            props.CorrelationData = correlation_data
        props.ContentType = "application/json"
        self.publish(topic, payload, qos=1, properties=props)

    def wait_published(self, infos: Iterable[mqtt.MQTTMessageInfo], *, timeout_s: float) -> None:
        """Wait until the broker has acknowledged every message; raise :class:`TransportError` if one
        is not acknowledged in time, the connection drops, or the broker refused one (a PUBACK failure)."""
        deadline = time.monotonic() + timeout_s
        for info in infos:
            try:
                info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                raise TransportError(f"broker connection lost while publishing: {exc}") from None
            if not info.is_published():
                raise TransportError(
                    f"MQTT broker {self.host}:{self.port} did not acknowledge a message within {timeout_s:g}s"
                )
            refused = self.refusal(info.mid, allow_no_subscribers=True)
            if refused is not None:
                raise TransportError(f"MQTT broker {self.host}:{self.port} refused a message: {refused}")

    def refusal(self, mid: int, *, allow_no_subscribers: bool = False) -> str | None:
        """Why the broker's PUBACK for message ``mid`` did not take it (MQTT 5 reason code), or None.

        paho marks a message published on any PUBACK; an ACL refusal (0x87), a quota (0x97) or "no
        matching subscribers" (0x10: nobody would get it, unless ``allow_no_subscribers``) come back here.
        """
        with self._lock:
            reason = self._refusals.pop(mid, None)
        if reason is None or (allow_no_subscribers and reason.value == NO_MATCHING_SUBSCRIBERS):
            return None
        return str(reason)

    def ack(self, message: mqtt.MQTTMessage) -> None:
        """Acknowledge a QoS 1 message (with ``manual_ack``), after it is safely handled."""
        self._client.ack(message.mid, message.qos)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any) -> None:
        with self._lock:
            if reason.is_failure or reason.value == NO_MATCHING_SUBSCRIBERS:
                self._refusals[mid] = reason
                while len(self._refusals) > 1000:  # telemetry nobody subscribes to lands here too
                    self._refusals.popitem(last=False)
            else:
                self._refusals.pop(mid, None)  # a reused mid: an old refusal must not stick to it

    # -- paho callbacks ---------------------------------------------------------------------------
    def _on_connect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Properties | None
    ) -> None:
        if reason.is_failure:
            self._connect_refusal = str(reason)
            self._answered.set()
            log.warning("broker %s:%s refused the connection: %s", self.host, self.port, reason)
            return
        self._connect_refusal = None
        self.broker_max_packet = getattr(_props, "MaximumPacketSize", None) if _props is not None else None
        with self._lock:
            self._is_connected = True
            subs = list(self._subs.items())
            calls = self._send_subscribe(subs) if subs else []
        self._run_calls(calls)
        log.info("connected to MQTT broker %s:%s", self.host, self.port)
        self.connected.set()
        self._answered.set()
        for hook in self._connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("connect hook failed")

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Properties | None
    ) -> None:
        with self._lock:
            self._is_connected = False
            self._pending_subacks.clear()
            self._granted.clear()
        if not self._answered.is_set():  # closed before CONNACK: TLS or authentication
            self._connect_refusal = f"{reason} before accepting us (credentials missing, wrong or revoked?)"
            self._answered.set()
        if self.connected.is_set():
            log.warning("disconnected from MQTT broker (%s); reconnecting", reason)
        self.connected.clear()

    @staticmethod
    def _on_unrouted(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        log.debug("message on %s matched no handler", message.topic)
