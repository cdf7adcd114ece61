"""The one MQTT wrapper (edge_agent/transport.py) against a real Mosquitto: what every client gets."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from cloud_trainer.demo.localbroker import LocalBroker, mosquitto_config
from cloud_trainer.errors import BrokerError
from cloud_trainer.releases.publish import Publisher
from edge_agent.transport import MqttTransport, TransportError
from tests.edge_agent.test_update_attacks import dynsec_broker
from tests.ports import retry_on_port_clash


def test_every_socket_has_tcp_nodelay(mosquitto: LocalBroker) -> None:
    transport = MqttTransport(host=mosquitto.host, port=mosquitto.port, client_id="t-nodelay")
    transport.connect()
    try:
        sock = transport._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        transport.stop()


def test_subscriptions_added_while_connecting_are_never_lost(mosquitto: LocalBroker, fleet: str) -> None:
    topics = [f"{fleet}/race/{i}" for i in range(200)]
    with Publisher(host=mosquitto.host, port=mosquitto.port) as pub:
        for topic in topics:
            pub.publish(topic, b"retained")
    got: set[str] = set()
    cond = threading.Condition()

    def on_message(topic: str, _payload: bytes, _retained: bool) -> None:
        with cond:
            got.add(topic)
            cond.notify_all()

    transport = MqttTransport(host=mosquitto.host, port=mosquitto.port, client_id=f"{fleet}-race"[:60])

    def add_all() -> None:
        for topic in topics:
            transport.subscribe(topic, on_message)

    adder = threading.Thread(target=add_all)
    try:
        adder.start()  # subscriptions arrive before, during and after the CONNACK
        transport.start()
        adder.join()
        deadline = time.monotonic() + 15
        with cond:
            while got != set(topics) and time.monotonic() < deadline:
                cond.wait(0.2)
        assert sorted(set(topics) - got) == []
        for topic in topics:
            transport.wait_subscribed(topic, timeout_s=5)
    finally:
        adder.join()
        transport.stop()


def test_a_refused_subscription_is_an_immediate_named_error(tmp_path: Path) -> None:
    broker = dynsec_broker(tmp_path / "broker")
    transport = MqttTransport(host=broker.host, port=broker.port, client_id="t-refused")
    refused: list[tuple[str, str]] = []
    try:
        transport.connect()
        start = time.monotonic()
        transport.subscribe(
            "edgeloop-chunks/v1/f/" + "a" * 64, lambda *_: None, on_refused=lambda t, r: refused.append((t, r))
        )
        with pytest.raises(
            TransportError, match=r"refused the subscription to edgeloop-chunks/v1/f/a+: Not authorized"
        ):
            transport.wait_subscribed("edgeloop-chunks/v1/f/" + "a" * 64, timeout_s=5)
        print(f"\nrefusal named after {time.monotonic() - start:.3f}s")
        assert refused == [("edgeloop-chunks/v1/f/" + "a" * 64, "Not authorized")]
        assert transport.subscription_error("edgeloop-chunks/v1/f/" + "a" * 64) == "Not authorized"
        transport.subscribe("edgeloop/v1/f/releases/m", lambda *_: None)
        transport.wait_subscribed("edgeloop/v1/f/releases/m", timeout_s=5)  # the allowed one is granted
    finally:
        transport.stop()
        broker.stop()


def test_the_publisher_names_a_broker_that_is_not_there() -> None:
    with (
        pytest.raises(BrokerError, match=r"cannot reach MQTT broker 127\.0\.0\.1:1: "),
        Publisher(host="127.0.0.1", port=1),
    ):
        pass


def test_the_broker_packet_limit_from_connack_bounds_payloads(tmp_path: Path) -> None:
    def start(port: int) -> LocalBroker:
        config = tmp_path / "mosquitto.conf"
        config.write_text(mosquitto_config(port).replace("max_packet_size 1048576", "max_packet_size 8192"))
        broker = LocalBroker(host="127.0.0.1", port=port, kind="mosquitto", workdir=tmp_path,
                             log_file=tmp_path / "broker.log", config_file=config)  # fmt: skip
        broker.restart()
        return broker

    broker = retry_on_port_clash(start)
    transport = MqttTransport(host=broker.host, port=broker.port, client_id="t-packet")
    try:
        transport.connect()
        assert transport.broker_max_packet == 8192
        limit = transport.max_payload("edgeloop/v1/f/devices/d/samples", 96 * 1024)
        assert 8000 < limit < 8192  # what the uploader's batches are cut to
    finally:
        transport.stop()
        broker.stop()
