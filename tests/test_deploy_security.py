"""The broker lets no one in where they don't belong: a real Mosquitto with the project's secure
configuration (deploy/mosquitto/edgeloop.conf), identities from `cloud-train pki init` and
`device add`, real TLS, and a real agent updating over it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_trainer.localbroker import free_port
from cloud_trainer.provision import Pki
from cloud_trainer.publish import push_bundle
from edge_agent.config import load_config
from edge_agent.mqtt_security import MqttSecurity, load_mqtt_file
from edge_agent.protocol import Topics
from tests.conftest import AgentProcess, Keys
from tests.mqttclient import TestClient, request_properties
from tests.securebroker import SecureBroker, start_secure_broker
from tests.tinymodel import make_tiny_bundle

FLEET = "plant-7"
OTHER_FLEET = "plant-9"
T = Topics(fleet=FLEET)


@dataclass
class Deployment:
    broker: SecureBroker
    pki: Pki
    root: Path

    def device_security(self, name: str) -> MqttSecurity:
        return MqttSecurity.from_config(load_config(self.root / name / "agent.toml").mqtt)

    def service_security(self, role: str) -> MqttSecurity:
        return MqttSecurity.from_config(load_mqtt_file(self.pki.root / role / "mqtt.toml"))

    def connect(self, security: MqttSecurity | None, *, client_id: str, password_port: bool = False) -> TestClient:
        port = self.broker.password_port if password_port else self.broker.port
        return TestClient(host="127.0.0.1", port=port, security=security, client_id=client_id)

    def device(self, name: str, *, client_id: str | None = None) -> TestClient:
        password = (self.root / name / "mqtt.password").exists()  # device add --auth password wrote it
        return self.connect(self.device_security(name), client_id=client_id or name, password_port=password)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    pki = Pki.init(
        root / "pki", broker_host="127.0.0.1", cert_port=free_port(), password_port=free_port(),
        release_key=keys.public,
    )  # fmt: skip
    pki.add_device("cam-1", fleet=FLEET, group="line-3", out=root / "cam-1")
    pki.add_device("cam-2", fleet=FLEET, out=root / "cam-2")
    pki.add_device("cam-9", fleet=OTHER_FLEET, out=root / "cam-9")
    pki.add_device("pw-1", fleet=FLEET, out=root / "pw-1", auth="password")
    broker = start_secure_broker(pki, root / "broker")
    yield Deployment(broker=broker, pki=pki, root=root)
    broker.stop()


def test_devices_and_services_connect_with_their_credentials(deployment: Deployment) -> None:
    clients = [
        deployment.device("cam-1"),
        deployment.device("pw-1"),
        deployment.connect(deployment.service_security("cloud"), client_id="cloud-1"),
        deployment.connect(deployment.service_security("collector"), client_id="collector-1"),
    ]
    try:
        assert [c.refusal for c in clients] == ["", "", "", ""]
        assert all(c.accepted for c in clients)
    finally:
        for client in clients:
            client.close()


def test_connections_without_valid_credentials_are_refused(deployment: Deployment, tmp_path: Path) -> None:
    ca = deployment.root / "cam-1" / "ca.crt"
    cam1 = deployment.device_security("cam-1")
    foreign = Pki.init(tmp_path / "foreign", broker_host="127.0.0.1", release_key=deployment.root / "cam-1/release.pub")
    foreign.add_device("cam-1", fleet=FLEET, out=tmp_path / "impostor")  # same name, another CA
    impostor = MqttSecurity(tls=True, ca_file=ca, cert_file=tmp_path / "impostor/device.crt",
                            key_file=tmp_path / "impostor/device.key")  # fmt: skip
    attempts = {
        "plain TCP": deployment.connect(None, client_id="a1"),
        "TLS without a client certificate": deployment.connect(MqttSecurity(tls=True, ca_file=ca), client_id="a2"),
        "a certificate from another CA": deployment.connect(impostor, client_id="a3"),
        "password listener, no user name": deployment.connect(
            MqttSecurity(tls=True, ca_file=ca), client_id="a4", password_port=True
        ),
        "password listener, wrong password": deployment.connect(
            MqttSecurity(tls=True, ca_file=ca, username="pw-1", password="guess"), client_id="a5", password_port=True
        ),
        "password listener, a certificate identity's name": deployment.connect(
            MqttSecurity(tls=True, ca_file=ca, username="cam-1", password=""), client_id="a6", password_port=True
        ),
        "plain TCP to the password listener": deployment.connect(
            MqttSecurity(username="pw-1", password=deployment.device_security("pw-1").password),
            client_id="a7",
            password_port=True,
        ),
    }
    accepted = [what for what, client in attempts.items() if client.accepted]
    assert accepted == []
    assert all(client.refusal for client in attempts.values())
    # The same broker still lets the real cam-1 in: the refusals above are about the credentials.
    real = deployment.connect(cam1, client_id="cam-1")
    assert real.accepted, real.refusal
    real.close()


def test_a_device_publishes_and_reads_only_its_own_topics(deployment: Deployment) -> None:
    cloud = deployment.connect(deployment.service_security("cloud"), client_id="cloud-watch")
    cam1 = deployment.device("cam-1")
    try:
        assert cloud.subscribe("edgeloop/v1/#") == "Granted QoS 1"
        refused_publish = {
            topic: cam1.publish(topic, b"{}", retain=True)
            for topic in (
                T.fleet_release("intents"),
                T.group_release("line-3", "intents"),
                T.device_release("cam-1", "intents"),
                T.chunk("0" * 64),
                T.fleet_sampling("intents"),
                T.device_sampling("cam-1"),
                T.device_state("cam-2"),
                T.device_telemetry("cam-2"),
                T.device_samples("cam-2"),
                T.device_infer("cam-2"),
                f"{T.device_replies('cam-2')}/r1",
                Topics(fleet=OTHER_FLEET).device_state("cam-1"),
            )
        }
        assert set(refused_publish.values()) == {"Not authorized"}, refused_publish
        allowed_publish = {
            topic: cam1.publish(topic, b"{}")
            for topic in (
                T.device_telemetry("cam-1"),
                T.device_samples("cam-1"),
                f"{T.device_replies('cam-1')}/r1",
                T.device_state("cam-1"),
            )
        }
        assert set(allowed_publish.values()) == {"Success"}, allowed_publish
        # One connection is served in order: once the last allowed message reached the cloud,
        # any refused one would have too. None did.
        cloud.wait_message(T.device_state("cam-1"))
        seen = {topic for topic, _payload, _props in cloud.messages}
        assert seen.isdisjoint(refused_publish), seen & set(refused_publish)

        # Mosquitto grants any SUBSCRIBE and filters each delivery by the subscriber's read ACL, so
        # "cannot read" means: what the cloud publishes there, retained or live, never reaches cam-1.
        foreign = [
            T.device_infer("cam-2"),
            T.device_release("cam-2", "intents"),
            T.device_state("cam-2"),
            T.device_samples("cam-2"),
            T.device_sampling("cam-2"),
            T.group_release("line-4", "intents"),
            Topics(fleet=OTHER_FLEET).fleet_release("intents"),
        ]
        own = [
            T.fleet_release("intents"),
            T.group_release("line-3", "intents"),
            T.device_release("cam-1", "intents"),
            T.chunk("a" * 64),
            T.fleet_sampling("intents"),
            T.device_sampling("cam-1"),
            T.device_infer("cam-1"),
        ]
        for topic in foreign:
            assert cloud.publish(topic, b"retained, not for cam-1", retain=True) == "Success"
        for topic in [*foreign, "edgeloop/v1/#", f"{T.base}/devices/+/state", *own]:
            cam1.subscribe(topic)
        for topic in foreign:
            assert cloud.publish(topic, b"not for cam-1") == "Success"
        for topic in own:  # after the foreign ones, on the same connection: delivered after them
            assert cloud.publish(topic, b"for cam-1") == "Success"
        cam1.wait_until(lambda: {t for t, _p, _props in cam1.messages} >= set(own))
        received = {topic for topic, _payload, _props in cam1.messages}
        assert received.isdisjoint(foreign), received & set(foreign)
    finally:
        cam1.close()
        cloud.close()


def test_only_the_cloud_publishes_releases_and_the_collector_only_reads(deployment: Deployment) -> None:
    cloud = deployment.connect(deployment.service_security("cloud"), client_id="cloud-pub")
    collector = deployment.connect(deployment.service_security("collector"), client_id="collector-1")
    pw1 = deployment.device("pw-1")
    try:
        assert pw1.publish(T.fleet_release("intents"), b"{}", retain=True) == "Not authorized"
        assert collector.publish(T.fleet_release("intents"), b"{}", retain=True) == "Not authorized"
        assert collector.publish(T.device_state("cam-1"), b"{}") == "Not authorized"
        assert cloud.publish(T.device_release("cam-2", "intents"), b"", retain=True) == "Success"
        shared = f"$share/collectors/{T.all_samples()}"
        assert collector.subscribe(shared) == "Granted QoS 1"
        assert pw1.publish(T.device_samples("pw-1"), b"batch") == "Success"
        assert collector.wait_message(T.device_samples("pw-1"))[0] == b"batch"
    finally:
        for client in (cloud, collector, pw1):
            client.close()


def test_revoked_identities_are_refused(deployment: Deployment) -> None:
    pki, root = deployment.pki, deployment.root
    pki.add_device("cam-r", fleet=FLEET, out=root / "cam-r")
    pki.add_device("pw-r", fleet=FLEET, out=root / "pw-r", auth="password")
    deployment.broker.sync()
    before = {name: deployment.device(name, client_id=f"{name}-before") for name in ("cam-r", "pw-r")}
    assert {n: c.refusal for n, c in before.items()} == {"cam-r": "", "pw-r": ""}

    pki.revoke_device("cam-r")
    pki.revoke_device("pw-r")
    deployment.broker.sync()
    after = {name: deployment.device(name, client_id=f"{name}-after") for name in ("cam-r", "pw-r")}
    assert [n for n, c in after.items() if c.accepted] == []
    assert "certificate" in deployment.broker.log()[-3000:]  # cam-r: the TLS handshake failed (CRL)
    # On reload Mosquitto re-checks connected password users and drops pw-r. A certificate is only
    # checked at the handshake, so cam-r's open connection stays, but its ACL lines are gone.
    assert before["pw-r"].dropped.wait(10), "the revoked password user is still connected"
    assert before["cam-r"].publish(T.device_state("cam-r"), b"{}") == "Not authorized"
    for client in before.values():
        client.close()
    # Others are untouched.
    cam2 = deployment.device("cam-2")
    assert cam2.accepted, cam2.refusal
    cam2.close()


def test_update_and_inference_over_tls_end_to_end(deployment: Deployment, keys: Keys, tmp_path: Path) -> None:
    config_dir = tmp_path / "etc-edge-agent"
    deployment.pki.add_device("cam-e2e", fleet=FLEET, group="line-3", out=config_dir, state_dir=str(tmp_path / "state"))
    deployment.broker.sync()
    port = free_port()
    config = config_dir / "agent.toml"
    config.write_text(config.read_text() + f"\n[http]\nport = {port}\n")  # the only change to what device add wrote
    cloud = deployment.connect(deployment.service_security("cloud"), client_id="cloud-e2e")
    agent = AgentProcess(config_path=config, http_port=port, log_path=tmp_path / "agent.log").start()
    try:
        assert cloud.subscribe(T.device_state("cam-e2e")) == "Granted QoS 1"
        assert cloud.subscribe(f"{T.device_replies('cam-e2e')}/#") == "Granted QoS 1"
        make_tiny_bundle(tmp_path / "v1", version=1)
        cloud_identity = load_mqtt_file(deployment.pki.root / "cloud" / "mqtt.toml")
        push_bundle(
            tmp_path / "v1", host=deployment.broker.host, port=deployment.broker.port, fleet=FLEET,
            key_path=keys.private, security=MqttSecurity.from_config(cloud_identity),
        )  # fmt: skip
        agent.wait_version(1)
        status, body = agent.predict(["turn on the lights"])
        assert (status, body["predictions"][0]["label"]) == (200, "lights_on")

        def online_with_v1() -> bool:
            states = [json.loads(p) for t, p, _ in cloud.messages if t == T.device_state("cam-e2e") and p]
            return any(s["online"] and s["active_version"] == 1 for s in states)

        cloud.wait_until(online_with_v1)  # the state the device published over TLS, as the cloud sees it

        # MQTT 5 inference over TLS: the reply goes to a response topic under the device's replies/.
        reply_topic = f"{T.device_replies('cam-e2e')}/req-1"
        request = json.dumps({"texts": ["switch off"]}).encode()
        props = request_properties(reply_topic, b"c-1")
        assert cloud.publish(T.device_infer("cam-e2e"), request, properties=props) == "Success"
        payload, reply_props = cloud.wait_message(reply_topic)
        assert reply_props.CorrelationData == b"c-1"
        assert json.loads(payload)["predictions"][0]["label"] == "lights_off"
    finally:
        cloud.close()
        assert agent.stop() == 0, agent.log()
