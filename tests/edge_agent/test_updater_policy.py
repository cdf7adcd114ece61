"""The updater's release policy without a broker: the real Updater, trust state, store and
onnxruntime, with chunks served from memory (the MQTT path is tested in test_update_attacks.py).

Each case is a race or an ordering that a broker test cannot pin down: a withdrawal landing
while an update starts, retained messages arriving in either order, a restart, a redelivery.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloud_trainer.releases.signing import generate_keypair, load_private_key, sign_release
from edge_agent.config import AgentConfig
from edge_agent.fetch import FetchCancelled
from edge_agent.protocol import Manifest, Release, Target, Topics, iter_chunks, safe_relative_path, sha256_bytes
from edge_agent.protocol.release import key_id_of, load_public_key
from edge_agent.runtime import ModelHolder
from edge_agent.store import ModelStore
from edge_agent.trust import UpdateRecord
from edge_agent.updater import StateChange, Updater
from tests.tinymodel import make_tiny_bundle

FLEET, MODEL, DEVICE, GROUP = "f1", "intents", "dev-1", "g1"
TOPICS = Topics(fleet=FLEET)
FLEET_TOPIC = TOPICS.fleet_release(MODEL)
GROUP_TOPIC = TOPICS.group_release(GROUP, MODEL)
DEVICE_TOPIC = TOPICS.device_release(DEVICE, MODEL)


@dataclass
class MemoryChunks:
    """A chunk source in memory; ``gate`` holds every fetch until set (a slow download)."""

    chunks: dict[str, bytes] = field(default_factory=dict)
    gate: threading.Event | None = None
    calls: int = 0
    store: ModelStore | None = None

    def fetch(
        self, sizes: dict[str, int], *, progress: object = None, cancelled: Callable[[], bool] = lambda: False
    ) -> int:
        self.calls += 1
        assert self.store is not None
        while self.gate is not None and not self.gate.wait(0.01):
            if cancelled():
                raise FetchCancelled("download cancelled")
        sent = 0
        for chunk in sizes:
            if not self.store.has_chunk(chunk):
                self.store.put_chunk(chunk, self.chunks[chunk])
                sent += len(self.chunks[chunk])
        return sent


class Device:
    """One device's updater over a state directory that survives :meth:`restart`."""

    def __init__(self, root: Path, keys: Path) -> None:
        self.root = root
        self.key = load_private_key(keys / "release.key")
        public = load_public_key(keys / "release.pub")
        self.trusted = {key_id_of(public): public}
        self.config = AgentConfig.model_validate(
            {
                "device_id": DEVICE, "fleet": FLEET, "group": GROUP, "model": MODEL,
                "state_dir": str(root / "state"),
                "update": {"trusted_keys": [str(keys / "release.pub")], "retry_base_s": 0.2},
            }
        )  # fmt: skip
        self.source = MemoryChunks()
        self.manifests: dict[int, tuple[str, int]] = {}
        self.reports: list[StateChange] = []
        self.activated: list[int] = []
        self.updater = self._make()

    def _make(self) -> Updater:
        self.store = ModelStore(state_dir=self.config.state_dir, model=MODEL)
        self.source.store = self.store
        updater = Updater(
            config=self.config, store=self.store, fetcher=self.source, holder=ModelHolder(),  # type: ignore[arg-type]
            trusted_keys=self.trusted, report=self.reports.append, on_activated=self.activated.append,
        )  # fmt: skip
        updater.reconcile()
        updater.start()
        return updater

    def restart(self) -> None:
        self.updater.stop()
        self.activated.clear()
        self.updater = self._make()

    def bundle(self, version: int, **kw: object) -> tuple[str, int]:
        if version not in self.manifests:
            directory = self.root / f"v{version}"
            make_tiny_bundle(directory, version=version, scale=float(version), **kw)  # type: ignore[arg-type]
            manifest = Manifest.read(directory)
            for entry in manifest.files:
                for sha, data in iter_chunks(directory / safe_relative_path(entry.path)):
                    self.source.chunks[sha] = data
            data = (directory / "manifest.json").read_bytes()
            self.source.chunks[sha256_bytes(data)] = data
            self.manifests[version] = (sha256_bytes(data), len(data))
        return self.manifests[version]

    def release(self, version: int, sequence: int, kind: str = "fleet") -> bytes:
        sha, size = self.bundle(version)
        name = {"fleet": FLEET, "group": GROUP, "device": DEVICE}[kind]
        now = datetime.now(timezone.utc)
        release = Release(
            fleet=FLEET, target=Target(kind=kind, name=name), model=MODEL, version=version,
            sequence=sequence, manifest_sha256=sha, manifest_size=size, issued_at=now,
            expires_at=now + timedelta(days=1),
        )  # fmt: skip
        return sign_release(release, self.key).to_bytes()

    def send(self, *messages: tuple[str, bytes], snapshot: bool = False) -> None:
        """Deliver messages as the MQTT thread does; ``snapshot``: as the retained set after a connect."""
        if snapshot:
            self.updater.begin_snapshot()
        for topic, payload in messages:
            self.updater.submit(topic, payload)
        if snapshot:
            self.updater.end_snapshot()
        self.settle()

    def settle(self) -> None:
        assert self.updater.idle.wait(20), "the updater did not become idle"

    @property
    def active(self) -> int | None:
        return self.store.active_version()

    def errors(self) -> list[str]:
        return [r.error or "" for r in self.reports if r.state == "rejected"]


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    generate_keypair(tmp_path / "keys")
    dev = Device(tmp_path, tmp_path / "keys")
    yield dev
    dev.updater.stop()


def test_a_withdrawal_that_lands_as_the_update_starts_wins(device: Device) -> None:
    device.send((FLEET_TOPIC, device.release(1, 1)))
    assert device.active == 1
    original = device.updater.trust.save
    fired: list[int] = []

    def save_then_withdraw() -> None:  # the withdrawal arrives while the worker persists v2's acceptance
        original()
        if not fired:
            fired.append(1)
            device.updater.submit(FLEET_TOPIC, b"")

    device.updater.trust.save = save_then_withdraw  # type: ignore[method-assign]
    device.send((FLEET_TOPIC, device.release(2, 2)))
    assert fired and device.active == 1
    assert "release v2 on" in (device.reports[-1].error or "") and "withdrawn" in (device.reports[-1].error or "")


def test_restart_of_a_pinned_device_switches_nothing_whatever_the_order(device: Device) -> None:
    fleet_v3, pin_v2 = device.release(3, 3), device.release(2, 2, "device")
    device.send((FLEET_TOPIC, device.release(1, 1)))
    device.send((DEVICE_TOPIC, pin_v2))
    device.send((FLEET_TOPIC, fleet_v3))
    assert device.active == 2
    device.restart()
    device.send((FLEET_TOPIC, fleet_v3), (DEVICE_TOPIC, pin_v2), snapshot=True)  # least specific first
    assert (device.active, device.activated) == (2, [])


def test_a_fresh_device_takes_its_pin_even_when_the_newer_fleet_release_comes_first(device: Device) -> None:
    device.send((FLEET_TOPIC, device.release(3, 3)), (DEVICE_TOPIC, device.release(2, 2, "device")), snapshot=True)
    assert device.active == 2
    assert device.errors() == []
    assert device.updater.trust.state.floor == 3


def test_a_release_withdrawn_while_the_device_was_away_cannot_come_back(device: Device) -> None:
    pin = device.release(2, 2, "device")
    device.send((FLEET_TOPIC, device.release(1, 1)), (DEVICE_TOPIC, pin), snapshot=True)
    assert device.active == 2
    device.restart()  # meanwhile the cloud cleared the pin and pushed v3 to the fleet
    device.send((FLEET_TOPIC, device.release(3, 3)), snapshot=True)  # the device topic delivers nothing
    assert device.active == 3
    assert device.updater.trust.state.topics[DEVICE_TOPIC].withdrawn
    device.send((DEVICE_TOPIC, pin))  # the old pin's exact bytes, replayed
    assert device.active == 3
    assert "withdrawn there before" in device.errors()[-1]


def test_an_old_release_is_not_accepted_just_because_a_pin_shadows_it(device: Device) -> None:
    device.send((FLEET_TOPIC, device.release(1, 1)), snapshot=True)
    device.send((DEVICE_TOPIC, device.release(3, 9, "device")))
    old_group = device.release(2, 1, "group")  # validly signed long ago, never seen here
    device.send((GROUP_TOPIC, old_group))
    assert "sequence 1 is not above 9" in device.errors()[-1]
    device.send((DEVICE_TOPIC, b""))  # the operator withdraws the pin: back to the fleet's v1
    assert device.active == 1


def test_a_refused_bundle_is_not_fetched_again_on_redelivery(device: Device) -> None:
    device.send((FLEET_TOPIC, device.release(1, 1)))
    device.bundle(5, nan=True)
    bad = device.release(5, 2, "device")
    device.send((DEVICE_TOPIC, bad))
    calls = device.source.calls
    assert "failed its health check" in device.errors()[-1]
    for _ in range(3):
        device.send((DEVICE_TOPIC, bad), snapshot=True)  # every reconnect redelivers it
    device.restart()
    device.send((FLEET_TOPIC, device.release(1, 1)), (DEVICE_TOPIC, bad), snapshot=True)
    assert device.source.calls == calls
    assert device.active == 1


def test_junk_on_a_more_specific_topic_does_not_strand_a_download(device: Device) -> None:
    device.send((FLEET_TOPIC, device.release(1, 1)))
    device.source.gate = threading.Event()
    device.updater.submit(FLEET_TOPIC, device.release(2, 2))
    while not any(r.state == "downloading" and r.version == 2 for r in device.reports):
        assert device.updater._thread.is_alive()
        threading.Event().wait(0.01)
    device.updater.submit(DEVICE_TOPIC, b'{"not": "a release"}')  # cancels the download, then is refused
    device.source.gate.set()
    device.settle()
    assert device.active == 2


def test_a_health_check_that_crashes_the_agent_twice_is_refused(device: Device) -> None:
    device.send((FLEET_TOPIC, device.release(1, 1)))
    device.bundle(2)
    for _ in range(2):  # as if the process died inside the health check of v2, twice
        device.updater.trust.state.update = UpdateRecord(state="health-checking", version=2, previous=1)
        device.updater.trust.save()
        device.restart()
    assert 2 in device.updater.trust.state.rolled_back
    assert "crashed the agent 2 times" in device.errors()[-1]
    device.send((FLEET_TOPIC, device.release(2, 2)))
    assert device.active == 1


def test_a_signature_that_is_not_base64_ascii_is_a_named_refusal(device: Device) -> None:
    key_id = next(iter(device.trusted))
    envelope = {"schema": "edgeloop.signed/1", "key_id": key_id, "payload": "{}", "signature": "\u00e9"}
    device.send((FLEET_TOPIC, json.dumps(envelope).encode()))
    assert "signature does not verify" in device.errors()[-1]
    assert not [r for r in device.reports if "internal error" in (r.error or "")]
