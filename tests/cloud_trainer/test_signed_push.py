"""A push is a signed, retained release that any subscriber holding the public key can verify."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import push_bundle
from edge_agent.protocol import Target, Topics, in_canary, key_id_of, load_public_key, open_release, sha256_bytes
from tests.conftest import Keys
from tests.tinymodel import make_tiny_bundle


def retained(broker: LocalBroker, topic: str) -> bytes:
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        done.set()

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert done.wait(10), f"nothing retained on {topic}"
    client.loop_stop()
    client.disconnect()
    return got[0]


def test_subscriber_verifies_pushed_release(tmp_path: Path, mosquitto: LocalBroker, keys: Keys, fleet: str) -> None:
    make_tiny_bundle(tmp_path / "b", version=4)
    result = push_bundle(
        tmp_path / "b", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=keys.private,
        target=Target(kind="group", name="beta"), canary_percent=25,
    )  # fmt: skip
    topics = Topics(fleet=fleet)
    assert result.topic == topics.group_release("beta", "intents")
    public = load_public_key(keys.public)
    release = open_release(retained(mosquitto, result.topic), {key_id_of(public): public})
    assert (release.version, release.canary_percent, release.target.name) == (4, 25, "beta")
    assert release.sequence == result.release.sequence
    assert release.expires_at > release.issued_at
    manifest = retained(mosquitto, topics.chunk(release.manifest_sha256))
    assert sha256_bytes(manifest) == release.manifest_sha256  # the signature covers the manifest, hence every file


def test_canary_membership_is_stable_and_proportional() -> None:
    devices = [f"dev-{i}" for i in range(2000)]
    members = [d for d in devices if in_canary(fleet="f", device=d, model="m", percent=10)]
    assert 150 < len(members) < 250
    assert members == [d for d in devices if in_canary(fleet="f", device=d, model="m", percent=10)]
    wider = {d for d in devices if in_canary(fleet="f", device=d, model="m", percent=50)}
    assert set(members) <= wider  # growing a canary keeps its first devices
