"""Attacks on the update path that an outside suite found, against a real Mosquitto and agent process.

Each must be refused with a reason that names it, and the version that serves keeps serving.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

from cloud_trainer.demo.localbroker import LocalBroker, mosquitto_config
from cloud_trainer.releases.publish import Publisher
from cloud_trainer.releases.signing import load_private_key
from edge_agent.protocol import Manifest, SignedEnvelope, Target, Topics, sha256_bytes
from edge_agent.protocol.release import key_id_of
from edge_agent.trust import BACKUP, PRIMARY
from tests.conftest import AgentProcess, Keys, StateListener
from tests.edge_agent.test_update_path import _retained, _signed, assert_still_serves_v1, publish_raw, push, rejected
from tests.ports import retry_on_port_clash
from tests.tinymodel import make_tiny_bundle

MODEL = "intents"


def error_has(*parts: str) -> Callable[[dict[str, object]], bool]:
    return lambda s: all(part in str(s.get("last_error") or "") for part in parts)


def manifest_ref(bundle: Path) -> dict[str, object]:
    data = (bundle / "manifest.json").read_bytes()
    return {"manifest_sha256": sha256_bytes(data), "manifest_size": len(data)}


def held_chunks(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "state" / "chunks").iterdir()}


def wait_held_chunks(tmp_path: Path, expected: set[str], timeout_s: float = 10.0) -> None:
    """The refusal is reported first, then the refused release's chunks are deleted."""
    deadline = time.monotonic() + timeout_s
    while held_chunks(tmp_path) != expected:
        assert time.monotonic() < deadline, f"held {held_chunks(tmp_path) - expected} beyond {expected}"
        time.sleep(0.05)


def test_a_release_replayed_on_another_topic_or_below_the_floor_is_refused(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys,
    agent_process: Callable[..., AgentProcess], state_listener: StateListener,
) -> None:  # fmt: skip
    topics = Topics(fleet=fleet)
    make_tiny_bundle(tmp_path / "v1", version=1)
    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0)
    push(tmp_path / "v1", mosquitto, fleet, keys, gc=False)
    agent = agent_process(group="g1")
    agent.wait_version(1)
    old = _retained(mosquitto, topics.fleet_release(MODEL))
    push(tmp_path / "v2", mosquitto, fleet, keys, gc=False)
    agent.wait_version(2)

    for topic in (topics.device_release("dev-1", MODEL), topics.group_release("g1", MODEL)):
        seen = len(state_listener.states)
        publish_raw(mosquitto, topic, old)  # the fleet's v1 release, validly signed, on a more specific topic
        state = state_listener.wait_for(rejected(1), since=seen)
        assert "targets fleet" in state["last_error"] and "replayed on another topic" in state["last_error"]
        assert topic in state["last_error"]

    # A release that really was signed for this device, but long ago: below the fleet's floor.
    seen = len(state_listener.states)
    stale = _signed(
        keys, fleet, target=Target(kind="device", name="dev-1"), version=1, sequence=1, **manifest_ref(tmp_path / "v1")
    )
    publish_raw(mosquitto, topics.device_release("dev-1", MODEL), stale)
    state = state_listener.wait_for(rejected(1), since=seen)
    assert "sequence 1 is not above" in state["last_error"] and "replay or rollback refused" in state["last_error"]
    status, body = agent.predict(["turn on the lights"])
    assert (status, body["version"]) == (200, 2)


def test_a_withdrawn_stalled_release_is_never_applied(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys,
    agent_process: Callable[..., AgentProcess], state_listener: StateListener,
) -> None:  # fmt: skip
    topics = Topics(fleet=fleet)
    make_tiny_bundle(tmp_path / "v1", version=1)
    push(tmp_path / "v1", mosquitto, fleet, keys)
    agent = agent_process(chunk_timeout_s=1, retry_base_s=1)
    agent.wait_version(1)
    agent.stop()

    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0, padding=300_000)
    push(tmp_path / "v2", mosquitto, fleet, keys)
    manifest = Manifest.read(tmp_path / "v2")
    model_entry = next(e for e in manifest.files if e.path == manifest.model_file)
    missing = model_entry.chunks[-1]
    chunk_bytes = _retained(mosquitto, topics.chunk(missing))
    publish_raw(mosquitto, topics.chunk(missing), b"")  # the broker lost one chunk: the download stalls

    agent.start()
    state_listener.wait_for(error_has("stalled", "retry 1"))
    seen = len(state_listener.states)
    publish_raw(mosquitto, topics.fleet_release(MODEL), b"")  # the cloud withdraws v2
    state_listener.wait_for(error_has("release v2", "withdrawn"), since=seen)
    publish_raw(mosquitto, topics.chunk(missing), chunk_bytes)  # ...and the chunk turns up after all

    # Past the time at which the stalled release's retries were due (1 s, then 2 s), v1 still serves.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert_still_serves_v1(agent)
        time.sleep(0.2)
    assert not [s for s in state_listener.states if s.get("active_version") == 2]
    assert "dropped a retry" not in agent.log()  # no retry was even left to drop: the withdrawal removed it


def test_amplified_and_oversize_manifests_are_refused_before_fetching(
    tmp_path: Path, serving_v1: AgentProcess, mosquitto: LocalBroker, fleet: str, keys: Keys,
    state_listener: StateListener,
) -> None:  # fmt: skip
    topics = Topics(fleet=fleet)
    before = held_chunks(tmp_path)

    # 300 extra chunk ids for a small file: the device would fetch 29 MB before assembly noticed.
    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0)
    manifest = json.loads((tmp_path / "v2" / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == manifest["golden_file"])
    entry["chunks"] += [sha256_bytes(str(i).encode()) for i in range(300)]
    data = json.dumps(manifest).encode()
    publish_raw(mosquitto, topics.chunk(sha256_bytes(data)), data)
    publish_raw(
        mosquitto,
        topics.fleet_release(MODEL),
        _signed(keys, fleet, version=2, sequence=50_000, manifest_sha256=sha256_bytes(data), manifest_size=len(data)),
    )
    state = state_listener.wait_for(rejected(2))
    assert f"of {entry['size']} bytes travels in 1 chunk(s)" in state["last_error"]
    assert "lists 301" in state["last_error"]
    wait_held_chunks(tmp_path, before)  # not one chunk fetched, and the manifest deleted again

    # A chunk whose bytes match its id but not the size the manifest declares (and over the limit).
    seen = len(state_listener.states)
    make_tiny_bundle(tmp_path / "v3", version=3, scale=3.0)
    manifest = json.loads((tmp_path / "v3" / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == manifest["golden_file"])
    oversize = b"x" * (130 * 1024)
    entry["size"], entry["chunks"] = 193, [sha256_bytes(oversize)]
    data = json.dumps(manifest).encode()
    with Publisher(host=mosquitto.host, port=mosquitto.port) as pub:
        pub.publish(topics.chunk(sha256_bytes(oversize)), oversize)
        pub.publish(topics.chunk(sha256_bytes(data)), data)
    publish_raw(
        mosquitto,
        topics.fleet_release(MODEL),
        _signed(keys, fleet, version=3, sequence=50_001, manifest_sha256=sha256_bytes(data), manifest_size=len(data)),
    )
    state = state_listener.wait_for(rejected(3), since=seen)
    assert f"is {len(oversize)} bytes, the manifest says 193" in state["last_error"]
    assert "retry" not in state["last_error"]  # refused, not deferred
    wait_held_chunks(tmp_path, before)  # the refused release's chunks are deleted
    assert_still_serves_v1(serving_v1)


def test_a_deeply_nested_payload_is_refused_by_name(
    serving_v1: AgentProcess, mosquitto: LocalBroker, fleet: str, keys: Keys, state_listener: StateListener
) -> None:
    topic = Topics(fleet=fleet).fleet_release(MODEL)
    nested = '{"fleet": ' + "[" * 100_000 + "]" * 100_000 + "}"
    key = load_private_key(keys.private)
    envelope = SignedEnvelope(
        key_id=key_id_of(key.public_key().public_bytes_raw()),
        payload=nested,
        signature=base64.b64encode(key.sign(nested.encode())).decode(),
    )
    publish_raw(mosquitto, topic, envelope.to_bytes())  # validly signed, so it reaches the release parser
    state = state_listener.wait_for(error_has("signed release payload is not a valid edgeloop.release/1"))
    assert "recursion limit exceeded" in state["last_error"]
    seen = len(state_listener.states)
    publish_raw(mosquitto, topic, b"[" * 100_000)  # the envelope itself
    state = state_listener.wait_for(error_has("not a valid edgeloop.signed/1"), since=seen)
    assert not [s for s in state_listener.states if "internal error" in str(s.get("last_error"))]
    assert_still_serves_v1(serving_v1)


def test_a_corrupt_trust_state_is_loud_and_accepts_no_rollback(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys,
    agent_process: Callable[..., AgentProcess], state_listener: StateListener,
) -> None:  # fmt: skip
    topics = Topics(fleet=fleet)
    for version in (1, 2, 3):
        make_tiny_bundle(tmp_path / f"v{version}", version=version, scale=float(version))
    push(tmp_path / "v1", mosquitto, fleet, keys)
    agent = agent_process()
    agent.wait_version(1)
    old = _retained(mosquitto, topics.fleet_release(MODEL))
    push(tmp_path / "v2", mosquitto, fleet, keys)
    agent.wait_version(2)
    agent.stop()
    root = tmp_path / "state" / "models" / MODEL

    # One copy torn: loud, kept aside, and the other copy keeps the floor.
    (root / PRIMARY).write_bytes(b'{"schema": "edgeloop.agent-state/1", "floor"')
    seen = len(state_listener.states)
    agent.start()
    state_listener.wait_for(error_has("state.json is corrupt", "recovered revision"), since=seen)
    assert [p for p in root.iterdir() if p.name.startswith(f"{PRIMARY}.corrupt-")]
    assert "trust state" in agent.log()
    seen = len(state_listener.states)
    publish_raw(mosquitto, topics.fleet_release(MODEL), old)  # the signed v1 release again
    state_listener.wait_for(rejected(1), since=seen)
    agent.wait_version(2)
    agent.stop()

    # Both copies unreadable: no floor to trust, so nothing is accepted until an operator acts.
    for name in (PRIMARY, BACKUP):
        (root / name).write_bytes(b"\x00" * 64)
    seen = len(state_listener.states)
    agent.start()
    state = state_listener.wait_for(rejected(None), since=seen)  # the retained v1 replay, refused again
    assert "unreadable" in state["last_error"] and "edge-agent reset-trust" in state["last_error"]
    seen = len(state_listener.states)
    push(tmp_path / "v3", mosquitto, fleet, keys)  # even a new, valid release waits for the operator
    state = state_listener.wait_for(rejected(None), since=seen)
    assert "edge-agent reset-trust" in state["last_error"]
    status, body = agent.predict(["switch off the lights"])
    assert (status, body["version"]) == (200, 2)  # and the device keeps serving what it had


def dynsec_broker(workdir: Path) -> LocalBroker:
    """Mosquitto with the dynamic-security plugin denying chunk subscriptions (a SUBACK 0x87, as
    a broker whose ACL forgot the device's chunk topics answers)."""
    workdir.mkdir(parents=True, exist_ok=True)
    security = {
        "defaultACLAccess": {
            "publishClientSend": True, "publishClientReceive": True, "subscribe": True, "unsubscribe": True,
        },
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "no-chunks"}], "clients": []}],
        "roles": [{"rolename": "no-chunks", "acls": [
            {"acltype": "subscribePattern", "topic": "edgeloop-chunks/v1/#", "priority": 0, "allow": False},
        ]}],
        "anonymousGroup": "anonymous",
    }  # fmt: skip
    (workdir / "dynsec.json").write_text(json.dumps(security))

    def start(port: int) -> LocalBroker:
        config = workdir / "mosquitto.conf"
        config.write_text(
            mosquitto_config(port)
            + "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so\n"
            + f"plugin_opt_config_file {workdir / 'dynsec.json'}\n"
        )
        broker = LocalBroker(
            host="127.0.0.1", port=port, kind="mosquitto", workdir=workdir, log_file=workdir / "broker.log",
            config_file=config,
        )  # fmt: skip
        broker.restart()  # starts it and waits until it listens
        return broker

    return retry_on_port_clash(start)


def test_a_refused_chunk_subscription_is_named_at_once(
    tmp_path: Path, fleet: str, keys: Keys, agent_process: Callable[..., AgentProcess]
) -> None:
    broker = dynsec_broker(tmp_path / "broker")
    listener = StateListener(broker, Topics(fleet=fleet).device_state("dev-1"))
    try:
        make_tiny_bundle(tmp_path / "v1", version=1)
        push(tmp_path / "v1", broker, fleet, keys, gc=False)
        agent = agent_process(broker=broker, chunk_timeout_s=60)
        start = time.monotonic()  # the agent answers HTTP: it is up and connecting
        downloading = listener.wait_for(lambda s: s.get("update_state") == "downloading")
        state = listener.wait_for(error_has("refused the subscription to", "edgeloop-chunks/", "Not authorized"))
        elapsed = time.monotonic() - start
        print(f"\nrefused subscription reported {elapsed:.2f}s after the agent was up (chunk timeout 60 s)")
        assert "retry 1" in state["last_error"]  # deferred: the operator may fix the ACL
        assert agent.process is not None and agent.process.poll() is None
        assert downloading["update_version"] == 1
        assert "not delivered" not in state["last_error"]  # named, not a timeout
    finally:
        listener.close()
        broker.stop()
