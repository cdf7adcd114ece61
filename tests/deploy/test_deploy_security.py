"""The broker lets no one in where they don't belong: a real Mosquitto with the project's secure
configuration (deploy/mosquitto/edgeloop.conf), identities from `cloud-train pki init` and
`device add`, real TLS, and a real agent updating over it."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_trainer.cli import build_parser
from cloud_trainer.demo.localbroker import free_port
from cloud_trainer.fleet.provision import Pki
from cloud_trainer.releases.publish import push_bundle
from cloud_trainer.samples.collect import Collector
from cloud_trainer.samples.store import SampleStore
from edge_agent.config import load_config
from edge_agent.mqtt_security import MqttSecurity, load_mqtt_file
from edge_agent.protocol import Topics
from tests.conftest import AgentProcess, Keys, http_json
from tests.mqttclient import TestClient, request_properties
from tests.ports import retry_on_port_clash
from tests.securebroker import SecureBroker, start_secure_broker
from tests.tinymodel import make_tiny_bundle

FLEET = "plant-7"
OTHER_FLEET = "plant-9"
SAMPLES_FLEET = "plant-5"  # the sample loop's own fleet: no retained release from the tests above
T = Topics(fleet=FLEET)
REPO = Path(__file__).parents[2]


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

    def service(self, role: str, *, client_id: str) -> TestClient:
        """Connect as the cloud or collector identity, on the listener its mqtt.toml names."""
        config = load_mqtt_file(self.pki.root / role / "mqtt.toml")
        return self.connect(
            self.service_security(role), client_id=client_id, password_port=config.port == self.broker.password_port
        )

    def device(self, name: str, *, client_id: str | None = None) -> TestClient:
        password = (self.root / name / "mqtt.password").exists()  # device add --auth password wrote it
        return self.connect(self.device_security(name), client_id=client_id or name, password_port=password)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Deployment]:
    def start(cert_port: int) -> Deployment:
        """The PKI names the broker's ports, so a port taken before the broker bound it means a new PKI."""
        root = tmp_path_factory.mktemp("deployment")
        pki = Pki.init(
            root / "pki", broker_host="127.0.0.1", cert_port=cert_port, password_port=free_port(),
            release_key=keys.public,
        )  # fmt: skip
        pki.add_device("cam-1", fleet=FLEET, group="line-3", out=root / "cam-1")
        pki.add_device("cam-2", fleet=FLEET, out=root / "cam-2")
        pki.add_device("cam-9", fleet=OTHER_FLEET, out=root / "cam-9")
        pki.add_device("pw-1", fleet=FLEET, out=root / "pw-1", auth="password")
        return Deployment(broker=start_secure_broker(pki, root / "broker"), pki=pki, root=root)

    deployment = retry_on_port_clash(start)
    try:
        yield deployment
    finally:
        deployment.broker.stop()


def test_devices_and_services_connect_with_their_credentials(deployment: Deployment) -> None:
    clients = [
        deployment.device("cam-1"),
        deployment.device("pw-1"),
        deployment.service("cloud", client_id="cloud-1"),
        deployment.service("collector", client_id="collector-1"),
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
    cloud = deployment.service("cloud", client_id="cloud-watch")
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
    cloud = deployment.service("cloud", client_id="cloud-pub")
    collector = deployment.service("collector", client_id="collector-1")
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
    config = config_dir / "agent.toml"
    config.write_text(config.read_text() + "\n[http]\nport = 0\n")  # the only change to what device add wrote
    agent = AgentProcess(config_path=config, log_path=tmp_path / "agent.log").start()
    cloud = None
    try:
        make_tiny_bundle(tmp_path / "v1", version=1)
        cloud_identity = load_mqtt_file(deployment.pki.root / "cloud" / "mqtt.toml")
        push_bundle(
            tmp_path / "v1", host=deployment.broker.host, port=deployment.broker.port, fleet=FLEET,
            key_path=keys.private, security=MqttSecurity.from_config(cloud_identity),
        )  # fmt: skip
        agent.wait_version(1)
        status, body = agent.predict(["turn on the lights"])
        assert (status, body["predictions"][0]["label"]) == (200, "lights_on")
        # After the push: the broker binds the client id to the identity, so the cloud identity
        # holds one connection at a time (push's first, then this one).
        cloud = deployment.service("cloud", client_id="cloud-e2e")
        assert cloud.subscribe(T.device_state("cam-e2e")) == "Granted QoS 1"
        assert cloud.subscribe(f"{T.device_replies('cam-e2e')}/#") == "Granted QoS 1"

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
        if cloud is not None:
            cloud.close()
        assert agent.stop() == 0, agent.log()


def _wait_for(what: str, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g}s"
        time.sleep(0.1)


def test_samples_and_feedback_reach_the_collector_over_tls_end_to_end(
    deployment: Deployment, keys: Keys, tmp_path: Path
) -> None:
    """The whole sample loop on the secure broker: a provisioned agent samples its predictions and
    uploads them with its certificate; the collector identity (its mqtt.toml as `pki init` wrote it)
    receives them through the $share subscription and stores each prediction once."""
    config_dir = tmp_path / "etc-edge-agent"
    deployment.pki.add_device("cam-s1", fleet=SAMPLES_FLEET, out=config_dir, state_dir=str(tmp_path / "state"))
    deployment.broker.sync()
    config = config_dir / "agent.toml"
    config.write_text(
        config.read_text()
        + "\n[http]\nport = 0\n"
        + "\n[sampling]\nrandom_rate = 1.0\n"  # every prediction is kept ...
        + "\n[outbox]\nupload_interval_s = 0.2\n"  # ... and uploaded soon
    )
    collector_mqtt = load_mqtt_file(deployment.pki.root / "collector" / "mqtt.toml")
    store = SampleStore(tmp_path / "samples")
    collector = Collector(
        store=store, fleet=SAMPLES_FLEET, host=collector_mqtt.host, port=collector_mqtt.port,
        security=MqttSecurity.from_config(collector_mqtt), topic_root=collector_mqtt.topic_root,
        client_id="collector-e2e",
    )  # fmt: skip
    assert (collector_mqtt.host, collector_mqtt.port) == (deployment.broker.host, deployment.broker.password_port)
    assert collector.topic == f"$share/collectors/{Topics(fleet=SAMPLES_FLEET).all_samples()}"
    collector.start()  # raises if the broker refused the identity or the subscription
    agent = AgentProcess(config_path=config, log_path=tmp_path / "agent.log")
    try:
        agent.start()
        make_tiny_bundle(tmp_path / "v1", version=1)
        push_bundle(
            tmp_path / "v1", host=deployment.broker.host, port=deployment.broker.port, fleet=SAMPLES_FLEET,
            key_path=keys.private, security=deployment.service_security("cloud"),
        )  # fmt: skip
        agent.wait_version(1)
        texts = ["turn on the lights", "switch off", "dark", "the bright lights"]
        predictions = []
        for batch in (texts[:1], texts[1:]):  # two requests, so probably more than one upload
            status, body = agent.predict(batch)
            assert status == 200, body
            predictions += body["predictions"]
        ids = [p["id"] for p in predictions]
        assert len(set(ids)) == len(texts)

        def stored_ids() -> set[str]:
            return {s.prediction_id for s in store.query()}

        _wait_for("the collector stores every prediction", lambda: stored_ids() >= set(ids))
        samples = {s.prediction_id: s for s in store.query(model="intents")}
        assert set(samples) == set(ids)  # exactly those: nothing from the golden checks, nothing twice
        for prediction_id, text, prediction in zip(ids, texts, predictions, strict=True):
            sample = samples[prediction_id]
            assert (sample.device, sample.fleet, sample.version, sample.text) == ("cam-s1", SAMPLES_FLEET, 1, text)
            assert (sample.predicted, sample.label) == (prediction["label"], None)
            assert "random" in sample.reasons.split(",")

        # Feedback: the app reports the true label of one prediction; it travels the same way.
        status, body = http_json(agent.http_port, "POST", "/v1/feedback", {"id": ids[1], "label": "lights_on"})
        assert status == 202, body
        _wait_for("the label arrives", lambda: store.get(ids[1]).label is not None)
        labelled = store.get(ids[1])
        assert (labelled.label, labelled.label_source, labelled.predicted) == ("lights_on", "device", "lights_off")
        assert store.counts() == {"samples": len(texts), "labelled": 1, "records_received": len(texts) + 1}
        assert [s.prediction_id for s in store.query(labelled=True)] == [ids[1]]
        assert (collector.stats.malformed, list(collector.stats.errors)) == (0, [])
        assert collector.stats.new_records == len(texts) + 1
    finally:
        collector.stop()
        store.close()
        if agent.process is not None:
            assert agent.stop() == 0, agent.log()


DIVERT_FLEET = "plant-4"  # no other collector session on its samples
BATCHES = [f"batch {i}".encode() for i in range(6)]


@dataclass
class SampleTraffic:
    collector: list[bytes]  # what the collector received of cam-s3's batches, in order
    intruder: list[str]  # the topics cam-s2 received on


def _samples_past_an_intruder(deployment: Deployment, intruder_topics: list[str], group: str) -> SampleTraffic:
    """cam-s3 publishes six sample batches while cam-s2 (same fleet) holds ``intruder_topics`` and a
    collector holds ``$share/{group}/...`` on the fleet's samples."""
    fleet = Topics(fleet=DIVERT_FLEET)
    for name in ("cam-s2", "cam-s3"):
        if not (deployment.root / name).exists():
            deployment.pki.add_device(name, fleet=DIVERT_FLEET, out=deployment.root / name)
    deployment.broker.sync()
    collector = deployment.service("collector", client_id=f"collector-{group}")
    cloud = deployment.service("cloud", client_id=f"cloud-{group}")
    cam2, cam3 = deployment.device("cam-s2"), deployment.device("cam-s3")
    try:
        assert collector.subscribe(f"$share/{group}/{fleet.all_samples()}") == "Granted QoS 1"
        for topic in intruder_topics:
            cam2.subscribe(topic)  # granted: Mosquitto's acl_file checks deliveries, not SUBSCRIBE
        assert cam2.subscribe(fleet.device_infer("cam-s2")) == "Granted QoS 1"
        for payload in BATCHES:
            assert cam3.publish(fleet.device_samples("cam-s3"), payload) == "Success"
        # cam-s3's batches were routed before their PUBACKs; what the cloud sends cam-s2 now comes after.
        assert cloud.publish(fleet.device_infer("cam-s2"), b"marker") == "Success"
        cam2.wait_message(fleet.device_infer("cam-s2"))

        def received() -> list[bytes]:
            return [p for t, p, _props in collector.messages if t == fleet.device_samples("cam-s3")]

        deadline = time.monotonic() + 3  # the collector's deliveries were queued before the PUBACKs
        while len(received()) < len(BATCHES) and time.monotonic() < deadline:
            time.sleep(0.05)
        return SampleTraffic(
            collector=received(), intruder=[t for t, _p, _props in cam2.messages if t != fleet.device_infer("cam-s2")]
        )
    finally:
        for client in (collector, cloud, cam2, cam3):
            client.close()


def test_a_device_cannot_read_another_devices_samples(deployment: Deployment) -> None:
    """Beyond the device topics above: not with a wildcard, and not with a shared subscription of its own."""
    fleet = Topics(fleet=DIVERT_FLEET)
    intruder_topics = [
        fleet.device_samples("cam-s3"),
        fleet.all_samples(),
        f"{fleet.base}/#",
        f"$share/intruders/{fleet.all_samples()}",
        f"$share/intruders/{fleet.device_samples('cam-s3')}",
    ]
    traffic = _samples_past_an_intruder(deployment, intruder_topics, group="read-test")
    assert traffic.intruder == []
    assert traffic.collector == BATCHES


def test_a_device_cannot_divert_batches_from_the_collectors_shared_subscription(deployment: Deployment) -> None:
    """Mosquitto's acl_file cannot refuse a SUBSCRIBE: a device in the collectors' $share group would
    be handed every other batch, which the broker then drops (the publisher already had its PUBACK,
    so those samples would be lost). `pki init` gives the collectors a secret group name, so a
    device can only guess one; it forms a group of its own and takes nothing from the collectors."""
    fleet = Topics(fleet=DIVERT_FLEET)
    secret = deployment.pki.share_group
    assert secret.startswith("collectors-") and len(secret) > 20
    assert (deployment.pki.root / "collector" / "share.env").read_text() == f"EDGELOOP_SHARE_GROUP={secret}\n"
    guesses = [f"$share/{group}/{fleet.all_samples()}" for group in ("collectors", "collector", "edgeloop")]
    traffic = _samples_past_an_intruder(deployment, guesses, group=secret)
    assert traffic.intruder == []
    assert traffic.collector == BATCHES


def test_the_collector_unit_runs_cloud_train_collect_with_its_real_flags() -> None:
    """systemd-analyze verify (tests/deploy/test_systemd.py) checks that the command exists, not its flags:
    cloud-train's own parser reads them here."""
    unit = (REPO / "systemd" / "cloud-train-collect.service").read_text()
    lines = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(("ExecStart=", "StateDirectory="))]
    exec_start, state_directory = lines
    argv = shlex.split(exec_start.replace("${FLEET}", FLEET))
    assert argv[:2] == ["/opt/edgeloop/venv/bin/cloud-train", "collect"]
    args = build_parser().parse_args(argv[1:])  # an unknown flag exits here (SystemExit 2)
    assert args.fleet == FLEET
    assert args.store == Path("/var/lib") / state_directory  # the StateDirectory systemd creates for it
    assert args.mqtt_config == Path("/etc/edgeloop/collector/mqtt.toml")
    assert (args.share_group, args.count, args.timeout) == (None, None, None)  # the secret group: share.env; runs on


def test_collect_by_hand_finds_the_secret_group_and_a_guessing_device_gets_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    """`cloud-train collect --mqtt-config <pki>/collector/mqtt.toml`, typed as docs/operations.md
    shows, with no environment: it reads the secret group from the share.env beside the config."""
    import os
    import subprocess
    import sys

    from cloud_trainer.cli.samples import resolve_share_group
    from cloud_trainer.errors import CloudTrainError
    from tests.cloud_trainer.test_sample_store import batch_of, records

    collector_toml = deployment.pki.root / "collector" / "mqtt.toml"
    secret = deployment.pki.share_group
    assert resolve_share_group(None, mqtt_config=collector_toml, secure=True) == secret
    for refused in ("collectors", None):
        with pytest.raises(CloudTrainError, match=r"guessable|no share group"):
            resolve_share_group(refused, mqtt_config=tmp_path / "elsewhere.toml", secure=True)

    fleet = Topics(fleet="plant-3")
    for name in ("cam-h1", "cam-h2"):
        deployment.pki.add_device(name, fleet="plant-3", out=deployment.root / name)
    deployment.broker.sync()
    env = {k: v for k, v in os.environ.items() if k != "EDGELOOP_SHARE_GROUP"}
    store = tmp_path / "store"
    collect = subprocess.Popen(
        [sys.executable, "-m", "cloud_trainer", "collect", "--fleet", "plant-3", "--store", str(store),
         "--mqtt-config", str(collector_toml), "--count", "20", "--timeout", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    guesser, sender = deployment.device("cam-h1"), deployment.device("cam-h2")
    assert guesser.accepted and sender.accepted, (guesser.refusal, sender.refusal)
    try:
        assert collect.stdout is not None
        first = collect.stdout.readline()  # printed once subscribed
        assert f"$share/{secret}/" in first, first
        for group in ("collectors", "collector", "edgeloop"):
            guesser.subscribe(f"$share/{group}/{fleet.all_samples()}")
        for i in range(20):
            batch = batch_of(records(1, fleet="plant-3", device="cam-h2", start=i), fleet="plant-3")
            assert sender.publish(fleet.device_samples("cam-h2"), batch.to_bytes()) == "Success"
        out, _ = collect.communicate(timeout=90)
    finally:
        if collect.poll() is None:
            collect.kill()
        guesser.close()
        sender.close()
    assert collect.returncode == 0, out
    assert "stopped: 20 new samples stored" in out
    assert guesser.messages == []
    assert SampleStore(store).counts()["samples"] == 20


def test_no_device_can_take_over_another_identitys_client_id(deployment: Deployment, tmp_path: Path) -> None:
    """The broker makes every client id the identity (use_username_as_clientid): device A connecting
    as B's or as the collector's client id, MQTT 5 or 3.1.1, gets a session of its own. B stays on,
    and B's batches wait in the collector's session until it comes back: none is lost."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from tests.cloud_trainer.test_sample_store import batch_of, records

    fleet_name = "plant-2"
    fleet = Topics(fleet=fleet_name)
    for name in ("cam-ta", "cam-tb"):
        deployment.pki.add_device(name, fleet=fleet_name, out=deployment.root / name)
    deployment.broker.sync()
    collector_mqtt = load_mqtt_file(deployment.pki.root / "collector" / "mqtt.toml")
    store = SampleStore(tmp_path / "store")

    def collector() -> Collector:
        return Collector(
            store=store, fleet=fleet_name, host=collector_mqtt.host, port=collector_mqtt.port,
            security=MqttSecurity.from_config(collector_mqtt), share_group=deployment.pki.share_group,
        )  # fmt: skip

    first = collector()
    first.start()  # its persistent session and subscription now exist on the broker...
    first.stop()  # ...and it goes away
    # An operator adds a device (broker reload) while the collector is away. Mosquitto 2.0.11 crashed
    # after this when the collector was a certificate client; it logs in by password (provision.py).
    deployment.pki.add_device("cam-tc", fleet=fleet_name, out=deployment.root / "cam-tc")
    deployment.broker.sync()
    b = deployment.device("cam-tb")
    a5_as_b = deployment.device("cam-ta", client_id="cam-tb")
    a5_as_collector = deployment.device("cam-ta", client_id="edgeloop-collector")
    from cloud_trainer.samples.collect import default_client_id

    # The collector's guessable default id, as the outside probe used it: 3.1.1, clean_session false.
    a3 = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=default_client_id(),
                     protocol=mqtt.MQTTv311, clean_session=False)  # fmt: skip
    deployment.device_security("cam-ta").apply(a3)
    connacks: list[str] = []
    a3.on_connect = lambda _c, _u, _f, reason, _p: connacks.append(str(reason))
    a3.connect(deployment.broker.host, deployment.broker.port)
    a3.loop_start()
    try:
        _wait_for("the 3.1.1 connection", lambda: bool(connacks))
        assert b.accepted and a5_as_b.accepted and a5_as_collector.accepted, "A is let in, as itself"
        sent = []
        for i in range(10):  # B publishes while A holds "its" client ids
            batch = batch_of(records(1, fleet=fleet_name, device="cam-tb", start=i), fleet=fleet_name)
            assert b.publish(fleet.device_samples("cam-tb"), batch.to_bytes()) == "Success"
            sent.append(batch.records[0].id)
        assert not b.dropped.is_set(), "B was knocked off"
        assert a5_as_b.messages == [] and a5_as_collector.messages == []
    finally:
        a3.loop_stop()
        a3.disconnect()
        for client in (a5_as_b, a5_as_collector, b):
            client.close()
    back = collector()
    back.start()
    try:
        _wait_for("the queued batches", lambda: back.stats.new_records >= 10)
    finally:
        back.stop(end_session=True)
    assert back.stats.new_records == 10
    assert set(sent) <= set(_stored_ids(store))
    assert deployment.broker.broker.process is not None and deployment.broker.broker.process.poll() is None


def _stored_ids(store: SampleStore) -> list[str]:
    return [row[0] for row in store._db.execute("SELECT id FROM received")]
