"""The agent's update path against a real Mosquitto, with the agent as a separate process.

Each bad release or bundle must be refused, reported on the device's state topic with a reason
that names the problem, and the agent must keep serving the version it had.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.errors import BundleError
from cloud_trainer.releases.publish import Publisher, push_bundle
from cloud_trainer.releases.signing import generate_keypair, load_private_key, sign_release
from edge_agent.protocol import Release, Target, Topics, sha256_bytes
from tests.conftest import AgentProcess, Keys, StateListener
from tests.tinymodel import make_tiny_bundle


def push(bundle: Path, broker: LocalBroker, fleet: str, keys: Keys, **kw: object) -> Release:
    return push_bundle(bundle, host=broker.host, port=broker.port, fleet=fleet, key_path=keys.private, **kw).release  # type: ignore[arg-type]


def publish_raw(broker: LocalBroker, topic: str, payload: bytes) -> None:
    with Publisher(host=broker.host, port=broker.port) as pub:
        pub.publish(topic, payload)


def assert_still_serves_v1(agent: AgentProcess) -> None:
    status, body = agent.predict(["turn on the lights"])
    assert status == 200
    assert body["version"] == 1
    assert body["predictions"][0]["label"] == "lights_on"


def rejected(version: int | None) -> Callable[[dict[str, object]], bool]:
    return lambda s: s.get("update_state") == "rejected" and s.get("update_version") == version


def test_release_is_fetched_verified_and_served(serving_v1: AgentProcess, state_listener: StateListener) -> None:
    assert_still_serves_v1(serving_v1)
    state = state_listener.wait_for(lambda s: s.get("update_state") == "active")
    assert state["online"] is True
    assert state["active_version"] == 1
    assert state["bytes_transferred"] > 0


def test_new_version_replaces_old_one(
    tmp_path: Path,
    serving_v1: AgentProcess,
    mosquitto: LocalBroker,
    fleet: str,
    keys: Keys,
    state_listener: StateListener,
) -> None:
    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0)
    push(tmp_path / "v2", mosquitto, fleet, keys)
    serving_v1.wait_version(2)
    state = state_listener.wait_for(lambda s: s.get("active_version") == 2)
    assert state["previous_version"] == 1
    status, body = serving_v1.predict(["switch off the lights"])
    assert (status, body["version"], body["predictions"][0]["label"]) == (200, 2, "lights_off")


def test_wrong_sha256_is_refused_and_reported_and_v1_keeps_serving(
    tmp_path: Path,
    serving_v1: AgentProcess,
    mosquitto: LocalBroker,
    fleet: str,
    keys: Keys,
    state_listener: StateListener,
) -> None:
    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0)
    manifest_path = tmp_path / "v2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "model.onnx")
    entry["sha256"] = sha256_bytes(b"not the model")
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match=r"model\.onnx.*sha256"):
        push(tmp_path / "v2", mosquitto, fleet, keys)  # the cloud side refuses it first
    push(tmp_path / "v2", mosquitto, fleet, keys, verify=False)  # an attacker's or a buggy publisher's

    state = state_listener.wait_for(rejected(2))
    assert "'model.onnx' has sha256" in state["last_error"]
    assert "failed verification" in state["last_error"]
    assert state["active_version"] == 1
    assert_still_serves_v1(serving_v1)


def test_release_signed_by_untrusted_key_is_refused(
    tmp_path: Path, serving_v1: AgentProcess, mosquitto: LocalBroker, fleet: str, state_listener: StateListener
) -> None:
    rogue_private, _ = generate_keypair(tmp_path / "rogue")
    make_tiny_bundle(tmp_path / "v2", version=2)
    push_bundle(tmp_path / "v2", host=mosquitto.host, port=mosquitto.port, fleet=fleet, key_path=rogue_private)
    state = state_listener.wait_for(rejected(None))
    assert "does not trust" in state["last_error"]
    assert_still_serves_v1(serving_v1)


def test_tampered_and_malformed_releases_are_refused(
    serving_v1: AgentProcess, mosquitto: LocalBroker, fleet: str, keys: Keys, state_listener: StateListener
) -> None:
    topic = Topics(fleet=fleet).fleet_release("intents")
    publish_raw(mosquitto, topic, b"{not json")
    state = state_listener.wait_for(lambda s: "not a valid edgeloop.signed/1" in (s.get("last_error") or ""))
    assert state["update_state"] == "rejected"

    now = datetime.now(timezone.utc)
    release = Release(
        fleet=fleet,
        target=Target(kind="fleet", name=fleet),
        model="intents",
        version=9,
        sequence=10_000,
        manifest_sha256="0" * 64,
        manifest_size=100,
        issued_at=now,
        expires_at=now + timedelta(days=1),
    )
    envelope = sign_release(release, load_private_key(keys.private)).model_dump(by_alias=True)
    envelope["payload"] = envelope["payload"].replace('"version":9', '"version":8')
    publish_raw(mosquitto, topic, json.dumps(envelope).encode())
    state_listener.wait_for(lambda s: "signature does not verify" in (s.get("last_error") or ""))
    assert_still_serves_v1(serving_v1)


def test_expired_release_is_refused(
    serving_v1: AgentProcess, mosquitto: LocalBroker, fleet: str, keys: Keys, state_listener: StateListener
) -> None:
    past = datetime.now(timezone.utc) - timedelta(days=2)
    release = Release(
        fleet=fleet,
        target=Target(kind="fleet", name=fleet),
        model="intents",
        version=2,
        sequence=10_001,
        manifest_sha256="0" * 64,
        manifest_size=100,
        issued_at=past,
        expires_at=past + timedelta(days=1),
    )
    topic = Topics(fleet=fleet).fleet_release("intents")
    publish_raw(mosquitto, topic, sign_release(release, load_private_key(keys.private)).to_bytes())
    state = state_listener.wait_for(rejected(2))
    assert "expired" in state["last_error"]
    assert_still_serves_v1(serving_v1)


def test_replayed_older_release_is_refused(
    tmp_path: Path,
    serving_v1: AgentProcess,
    mosquitto: LocalBroker,
    fleet: str,
    keys: Keys,
    state_listener: StateListener,
) -> None:
    topic = Topics(fleet=fleet).fleet_release("intents")
    old = _retained(mosquitto, topic)
    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0)
    push(tmp_path / "v2", mosquitto, fleet, keys)
    serving_v1.wait_version(2)
    serving_v1.stop()  # what the refusal needs (the newest sequence accepted) survives a restart
    serving_v1.start()
    serving_v1.wait_version(2)
    with Publisher(host=mosquitto.host, port=mosquitto.port) as pub:
        pub.publish(topic, old)  # the signed v1 release again: valid signature, older sequence
    state = state_listener.wait_for(rejected(1))
    assert "rollback refused" in state["last_error"]
    status, body = serving_v1.predict(["turn on"])
    assert (status, body["version"]) == (200, 2)


def test_model_with_nan_outputs_fails_health_check(
    tmp_path: Path,
    serving_v1: AgentProcess,
    mosquitto: LocalBroker,
    fleet: str,
    keys: Keys,
    state_listener: StateListener,
) -> None:
    make_tiny_bundle(tmp_path / "v2", version=2, nan=True)
    push(tmp_path / "v2", mosquitto, fleet, keys)
    state = state_listener.wait_for(rejected(2))
    assert "health check" in state["last_error"]
    assert "NaN" in state["last_error"]
    assert_still_serves_v1(serving_v1)


def test_restart_serves_installed_version_without_broker_traffic(
    tmp_path: Path, serving_v1: AgentProcess, mosquitto: LocalBroker
) -> None:
    serving_v1.stop()
    mosquitto_down = serving_v1.config_path.read_text().replace(f"port = {mosquitto.port}", "port = 1")
    serving_v1.config_path.write_text(mosquitto_down)
    serving_v1.start()
    serving_v1.wait_version(1, timeout_s=15)  # verified from disk, no broker needed
    assert_still_serves_v1(serving_v1)


def _retained(broker: LocalBroker, topic: str) -> bytes:
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        done.set()

    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert done.wait(10), f"nothing retained on {topic}"
    client.loop_stop()
    client.disconnect()
    return got[0]


def test_device_outside_a_canary_keeps_its_version(
    tmp_path: Path,
    serving_v1: AgentProcess,
    mosquitto: LocalBroker,
    fleet: str,
    keys: Keys,
    state_listener: StateListener,
) -> None:
    from edge_agent.protocol import in_canary

    outside = next(
        p for p in (1.0, 2.0, 5.0, 10.0, 20.0) if not in_canary(fleet=fleet, device="dev-1", model="intents", percent=p)
    )
    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0)
    push(tmp_path / "v2", mosquitto, fleet, keys, canary_percent=outside)
    serving_v1.wait_log(r"release v2 is a [0-9.]+% canary this device is not in")  # its decision, logged
    assert_still_serves_v1(serving_v1)
    assert not [s for s in state_listener.states if s.get("update_version") == 2]
    push(tmp_path / "v2", mosquitto, fleet, keys, canary_percent=100)
    serving_v1.wait_version(2)


def _signed(keys: Keys, fleet: str, **fields: object) -> bytes:
    now = datetime.now(timezone.utc)
    base: dict[str, object] = {
        "fleet": fleet, "target": Target(kind="fleet", name=fleet), "model": "intents", "version": 2,
        "sequence": 50_000, "manifest_sha256": "0" * 64, "manifest_size": 100, "issued_at": now,
        "expires_at": now + timedelta(days=1),
    }  # fmt: skip
    base.update(fields)
    return sign_release(Release.model_validate(base), load_private_key(keys.private)).to_bytes()


def test_mix_and_match_is_refused(
    tmp_path: Path, serving_v1: AgentProcess, mosquitto: LocalBroker, fleet: str, keys: Keys,
    state_listener: StateListener,
) -> None:  # fmt: skip
    make_tiny_bundle(tmp_path / "v3", version=3, scale=3.0)
    manifest = (tmp_path / "v3" / "manifest.json").read_bytes()
    with Publisher(host=mosquitto.host, port=mosquitto.port) as pub:
        pub.publish(Topics(fleet=fleet).chunk(sha256_bytes(manifest)), manifest)
    # a correctly signed release for v2 that points at v3's manifest
    payload = _signed(keys, fleet, version=2, manifest_sha256=sha256_bytes(manifest), manifest_size=len(manifest))
    publish_raw(mosquitto, Topics(fleet=fleet).fleet_release("intents"), payload)
    state = state_listener.wait_for(rejected(2))
    assert "mix-and-match refused" in state["last_error"]
    assert_still_serves_v1(serving_v1)


def test_file_larger_than_declared_is_refused(
    tmp_path: Path, serving_v1: AgentProcess, mosquitto: LocalBroker, fleet: str, keys: Keys,
    state_listener: StateListener,
) -> None:  # fmt: skip
    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0)
    path = tmp_path / "v2" / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "tokenizer.json")
    entry["size"] = 10  # the chunks carry far more than this
    path.write_text(json.dumps(manifest))
    push(tmp_path / "v2", mosquitto, fleet, keys, verify=False)
    state = state_listener.wait_for(rejected(2))
    assert "'tokenizer.json' is larger than the 10 bytes declared" in state["last_error"]
    assert_still_serves_v1(serving_v1)


def test_bundle_over_the_configured_limit_is_refused(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys,
    agent_process: Callable[..., AgentProcess], state_listener: StateListener,
) -> None:  # fmt: skip
    make_tiny_bundle(tmp_path / "v1", version=1, padding=200_000)
    push(tmp_path / "v1", mosquitto, fleet, keys)
    agent_process(max_bundle_bytes=100_000)
    state = state_listener.wait_for(rejected(1))
    assert "exceeds max_bundle_bytes 100000" in state["last_error"]


def test_signed_release_can_pin_an_earlier_version(
    tmp_path: Path, serving_v1: AgentProcess, mosquitto: LocalBroker, fleet: str, keys: Keys,
    state_listener: StateListener,
) -> None:  # fmt: skip
    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0)
    push(tmp_path / "v2", mosquitto, fleet, keys)
    serving_v1.wait_version(2)
    push(tmp_path / "v1", mosquitto, fleet, keys)  # v1 again, in a new release with a higher sequence
    serving_v1.wait_version(1)
    state = state_listener.wait_for(lambda s: s.get("active_version") == 1 and s.get("previous_version") == 2)
    assert state["bytes_transferred"] == 0  # every chunk of an installed version is still held


def test_error_rate_in_the_watch_window_rolls_back(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys,
    agent_process: Callable[..., AgentProcess], state_listener: StateListener,
) -> None:  # fmt: skip
    make_tiny_bundle(tmp_path / "v1", version=1)
    push(tmp_path / "v1", mosquitto, fleet, keys)
    agent = agent_process(watch_s=60, min_requests=10, max_error_rate=0.2)
    agent.wait_version(1)
    make_tiny_bundle(tmp_path / "v2", version=2, fragile=True)  # passes its golden vectors, fails on real traffic
    push(tmp_path / "v2", mosquitto, fleet, keys)
    agent.wait_version(2)

    statuses = [agent.predict(["switch on the lights"])[0] for _ in range(10)]
    assert statuses.count(500) == 10
    state = state_listener.wait_for(lambda s: s.get("update_state") == "rolled-back")
    assert "10 of 10 requests failed" in state["last_error"]
    assert (state["active_version"], state["previous_version"]) == (1, 2)
    agent.wait_version(1)
    assert_still_serves_v1(agent)

    agent.stop()  # the retained v2 release arrives again after a restart; it stays refused
    agent.start()
    again = state_listener.wait_for(lambda s: "was rolled back on this device" in (s.get("last_error") or ""))
    assert again["update_version"] == 2
    assert_still_serves_v1(agent)


def test_after_kill_9_the_will_says_offline_and_the_state_keeps_the_last_truth(
    serving_v1: AgentProcess, mosquitto: LocalBroker, fleet: str, state_listener: StateListener
) -> None:
    topics = Topics(fleet=fleet)
    availability = StateListener(mosquitto, topics.device_availability("dev-1"))
    try:
        availability.wait_for(lambda a: a["online"] is True)
        publish_raw(mosquitto, topics.fleet_release("intents"), b"{not json")  # an error worth remembering
        before = state_listener.wait_for(lambda s: "not a valid edgeloop.signed/1" in (s.get("last_error") or ""))
        assert serving_v1.process is not None
        serving_v1.process.kill()  # no clean goodbye: the broker publishes the will after 1.5 x keepalive (5 s)
        serving_v1.process.wait()
        will = availability.wait_for(lambda a: a["online"] is False, timeout_s=20)
        assert (will["device"], will["at"]) == ("dev-1", None)  # the broker sent it: the receiver dates it
        assert will["connected_at"] <= before["updated_at"]
    finally:
        availability.close()
    retained = json.loads(_retained(mosquitto, topics.device_state("dev-1")))
    assert retained == before  # the will erased nothing: version, error and its time are intact
    assert (retained["active_version"], retained["update_state"]) == (1, "rejected")
