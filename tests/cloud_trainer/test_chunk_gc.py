"""Chunk GC against a real Mosquitto: the chunks no current release needs go, every other chunk stays."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.errors import UnreadableRelease
from cloud_trainer.releases.chunk_gc import GcResult, collect_garbage, parse_release, read_live_set
from cloud_trainer.releases.publish import Publisher, PushResult, push_bundle
from cloud_trainer.releases.registry import Registry
from cloud_trainer.releases.signing import load_private_key, sign_release
from edge_agent.protocol import MANIFEST_NAME, MalformedPayload, Manifest, Release, Target, Topics, sha256_bytes
from tests.conftest import AgentProcess, Keys
from tests.mqttclient import TestClient
from tests.tinymodel import make_tiny_bundle


def push(bundle: Path, broker: LocalBroker, fleet: str, keys: Keys, **kw: object) -> PushResult:
    return push_bundle(bundle, host=broker.host, port=broker.port, fleet=fleet, key_path=keys.private, **kw)  # type: ignore[arg-type]


def publish_raw(broker: LocalBroker, topic: str, payload: bytes) -> None:
    with Publisher(host=broker.host, port=broker.port, client_id="test-raw") as pub:
        pub.publish(topic, payload)


def bundle_chunks(bundle: Path) -> set[str]:
    """The chunk ids a push of ``bundle`` puts on the broker: its manifest and every file's chunks."""
    manifest = Manifest.read(bundle)
    return {sha256_bytes((bundle / MANIFEST_NAME).read_bytes())} | {c for f in manifest.files for c in f.chunks}


def retained_chunks(broker: LocalBroker, fleet: str) -> set[str]:
    """The chunk ids the broker retains for ``fleet``, read independently of chunk_gc.

    After the SUBACK, until a second passes without a new message.
    """
    client = TestClient(host=broker.host, port=broker.port, security=None, client_id=f"reader-{secrets.token_hex(3)}")
    assert client.accepted, client.refusal
    try:
        assert client.subscribe(f"{Topics(fleet=fleet).chunk_base}/+") == "Granted QoS 1"
        deadline = time.monotonic() + 30
        seen = -1
        while seen != len(client.messages):
            assert time.monotonic() < deadline, "retained chunks kept arriving"
            seen = len(client.messages)
            time.sleep(1.0)
        return {topic.rsplit("/", 1)[1] for topic, payload, _ in client.messages if payload}
    finally:
        client.close()


@pytest.fixture
def bundles(tmp_path: Path) -> tuple[Path, Path]:
    """v1 and v2 of the tiny model; different weights, the same tokenizer (so some chunks are shared)."""
    make_tiny_bundle(tmp_path / "v1", version=1)
    make_tiny_bundle(tmp_path / "v2", version=2, scale=2.0)
    return tmp_path / "v1", tmp_path / "v2"


def test_a_push_clears_the_chunks_only_the_replaced_release_used(
    bundles: tuple[Path, Path],
    mosquitto: LocalBroker,
    fleet: str,
    keys: Keys,
    agent_process: Callable[..., AgentProcess],
) -> None:
    v1, v2 = (bundle_chunks(b) for b in bundles)
    assert v1 & v2, "the tiny bundles share their tokenizer"
    assert v1 - v2, "and differ in the model and the manifest"

    first = push(bundles[0], mosquitto, fleet, keys)
    assert first.chunks_cleared == 0
    assert retained_chunks(mosquitto, fleet) == v1

    second = push(bundles[1], mosquitto, fleet, keys)
    assert second.chunks_cleared == len(v1 - v2)
    assert retained_chunks(mosquitto, fleet) == v2  # every chunk of v2 and its manifest stay

    agent = agent_process()  # a fresh device still installs v2 from the broker
    agent.wait_version(2)


def test_sweep_clears_only_what_no_release_needs(
    bundles: tuple[Path, Path], mosquitto: LocalBroker, fleet: str, keys: Keys
) -> None:
    push(bundles[0], mosquitto, fleet, keys, target=Target(kind="group", name="beta"))
    push(bundles[1], mosquitto, fleet, keys)  # the fleet topic: replaces nothing, clears nothing
    orphan = os.urandom(1000)
    orphan_id = sha256_bytes(orphan)
    publish_raw(mosquitto, Topics(fleet=fleet).chunk(orphan_id), orphan)
    needed = bundle_chunks(bundles[0]) | bundle_chunks(bundles[1])
    assert retained_chunks(mosquitto, fleet) == needed | {orphan_id}
    live = read_live_set(host=mosquitto.host, port=mosquitto.port, fleet=fleet)
    topics = Topics(fleet=fleet)
    assert set(live.releases) == {topics.group_release("beta", "intents"), topics.fleet_release("intents")}
    assert live.chunks == frozenset(needed)
    assert not live.problems

    def sweep(*, dry_run: bool = False) -> GcResult:
        return collect_garbage(host=mosquitto.host, port=mosquitto.port, fleet=fleet, dry_run=dry_run)

    dry = sweep(dry_run=True)
    assert (dry.dry_run, dry.releases, dict(dry.removed), dry.bytes_freed) == (True, 2, {orphan_id: 1000}, 1000)
    assert set(dry.kept) == needed
    assert retained_chunks(mosquitto, fleet) == needed | {orphan_id}  # a dry run clears nothing

    swept = sweep()
    assert (swept.dry_run, dict(swept.removed), swept.bytes_freed) == (False, {orphan_id: 1000}, 1000)
    assert swept.kept == dry.kept
    assert retained_chunks(mosquitto, fleet) == needed

    again = sweep()
    assert (dict(again.removed), set(again.kept)) == ({}, needed)


def _garbage(_keys: Keys) -> bytes:
    return b"not a release"


def _unsigned_nonsense(_keys: Keys) -> bytes:
    return b'{"schema": "edgeloop.signed/1", "key_id": "k", "payload": "{}", "signature": ""}'


def _manifest_missing(keys: Keys) -> bytes:
    now = datetime.now(timezone.utc)
    release = Release(
        fleet="f", target=Target(kind="device", name="dev-9"), model="intents", version=9, sequence=1,
        manifest_sha256="ab" * 32, manifest_size=100, issued_at=now, expires_at=now + timedelta(days=1),
    )  # fmt: skip
    return sign_release(release, load_private_key(keys.private)).to_bytes()


@pytest.mark.parametrize("payload", [_garbage, _unsigned_nonsense, _manifest_missing])
def test_an_unreadable_release_stops_the_sweep(
    payload: Callable[[Keys], bytes], bundles: tuple[Path, Path], mosquitto: LocalBroker, fleet: str, keys: Keys
) -> None:
    push(bundles[0], mosquitto, fleet, keys)
    bad_topic = Topics(fleet=fleet).device_release("dev-9", "intents")
    publish_raw(mosquitto, bad_topic, payload(keys))
    orphan = os.urandom(500)
    publish_raw(mosquitto, Topics(fleet=fleet).chunk(sha256_bytes(orphan)), orphan)
    before = retained_chunks(mosquitto, fleet)

    for dry_run in (True, False):
        with pytest.raises(UnreadableRelease) as refused:
            collect_garbage(host=mosquitto.host, port=mosquitto.port, fleet=fleet, dry_run=dry_run)
        assert refused.value.topics == [bad_topic]
        assert bad_topic in str(refused.value)
        assert "cleared nothing" in str(refused.value)
    assert retained_chunks(mosquitto, fleet) == before


def test_automatic_gc_failing_does_not_fail_the_push(
    bundles: tuple[Path, Path], mosquitto: LocalBroker, fleet: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    push(bundles[0], mosquitto, fleet, keys)
    bad_topic = Topics(fleet=fleet).group_release("beta", "intents")
    publish_raw(mosquitto, bad_topic, b"{}")
    with caplog.at_level(logging.WARNING, logger="cloud_trainer.releases.chunk_gc"):
        result = push(bundles[1], mosquitto, fleet, keys)
    assert (result.release.version, result.chunks_cleared) == (2, 0)
    assert any(bad_topic in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), caplog.text
    assert retained_chunks(mosquitto, fleet) == bundle_chunks(bundles[0]) | bundle_chunks(bundles[1])


def test_parse_release_needs_no_key_and_names_the_problem(keys: Keys) -> None:
    assert parse_release(_manifest_missing(keys)).version == 9
    with pytest.raises(MalformedPayload, match="not a signed release envelope"):
        parse_release(b"not a release")
    with pytest.raises(MalformedPayload, match="payload is not a valid release"):
        parse_release(_unsigned_nonsense(keys))


def cloud_train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloud_trainer", *args], capture_output=True, text=True, timeout=120)


def test_cli_push_no_gc_then_chunks_gc(tmp_path: Path, mosquitto: LocalBroker, fleet: str, keys: Keys) -> None:
    registry = Registry(tmp_path / "registry")
    v1 = registry.register("intents", version=None, build=lambda d, v, _p: make_tiny_bundle(d, version=v))
    v2 = registry.register("intents", version=None, build=lambda d, v, _p: make_tiny_bundle(d, version=v, scale=2.0))
    old, new = bundle_chunks(v1.bundle_dir), bundle_chunks(v2.bundle_dir)
    common = ["--fleet", fleet, "--broker", f"{mosquitto.host}:{mosquitto.port}"]
    pushed = ["--registry", str(registry.root), "--key", str(keys.private), *common]

    for ref, extra in (("intents:1", []), ("intents:2", ["--no-gc"])):
        result = cloud_train("push", ref, *pushed, *extra)
        assert result.returncode == 0, result.stderr
        assert "cleared" not in result.stdout
    assert retained_chunks(mosquitto, fleet) == old | new  # --no-gc kept v1's chunks

    dry = cloud_train("chunks", "gc", "--dry-run", *common)
    assert dry.returncode == 0, dry.stderr
    assert f"kept {len(new)} chunks" in dry.stdout
    assert "1 current release(s)" in dry.stdout
    assert f"would remove {len(old - new)} chunks" in dry.stdout
    assert all(sha in dry.stdout for sha in old - new)
    assert retained_chunks(mosquitto, fleet) == old | new

    swept = cloud_train("chunks", "gc", *common)
    assert swept.returncode == 0, swept.stderr
    assert f"removed {len(old - new)} chunks (0.0" in swept.stdout
    assert retained_chunks(mosquitto, fleet) == new


def test_cli_chunks_gc_errors_are_one_line(mosquitto: LocalBroker, fleet: str) -> None:
    publish_raw(mosquitto, Topics(fleet=fleet).fleet_release("intents"), b"garbage")
    refused = cloud_train("chunks", "gc", "--fleet", fleet, "--broker", f"{mosquitto.host}:{mosquitto.port}")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: chunk GC cleared nothing")
    assert Topics(fleet=fleet).fleet_release("intents") in refused.stderr
    assert "Traceback" not in refused.stderr


def test_chunks_command_help_does_not_import_chunk_gc() -> None:
    code = (
        "import sys; from cloud_trainer.cli import build_parser; build_parser(); "
        "print('cloud_trainer.releases.chunk_gc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
