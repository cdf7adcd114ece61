"""Publishing a bundle to a fleet: chunks first, then the signed release, all retained."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt

from cloud_trainer.errors import BrokerError, BundleError
from cloud_trainer.releases.signing import load_private_key, next_sequence, sign_release
from edge_agent.mqtt_security import MqttSecurity
from edge_agent.protocol import (
    MANIFEST_NAME,
    Manifest,
    ProtocolError,
    Release,
    Target,
    Topics,
    iter_chunks,
    safe_relative_path,
    sha256_bytes,
    verify_bundle_files,
)
from edge_agent.transport import MqttTransport, TransportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    release: Release
    topic: str
    chunks: int
    bytes: int
    chunks_cleared: int = 0
    """chunks of the release this one replaced that no current release needed, cleared (``gc``)"""


class Publisher:
    """A short-lived MQTT connection for publishing (the project's :class:`MqttTransport`); a context manager.

    Args:
        host: broker host.
        port: broker port.
        client_id: MQTT client id.
        protocol: MQTT protocol version, ``"5"`` or ``"3.1.1"``.
        timeout_s: how long to wait for the broker to accept the connection and each message.
        security: TLS and credentials (the cloud identity of `cloud-train pki init`); none by default.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str = "cloud-train",
        protocol: str = "5",
        timeout_s: float = 10.0,
        security: MqttSecurity | None = None,
    ) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.transport = MqttTransport(
            host=host, port=port, client_id=client_id, protocol=protocol, security=security, max_inflight=64
        )
        self._pending: list[mqtt.MQTTMessageInfo] = []

    def __enter__(self) -> Publisher:
        try:
            self.transport.connect(timeout_s=self.timeout_s)
        except TransportError as exc:
            raise BrokerError(str(exc)) from None
        return self

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        try:
            info = self.transport.publish(topic, payload, qos=1, retain=retain)
        except TransportError as exc:
            raise BrokerError(str(exc)) from None
        self._pending.append(info)
        if len(self._pending) >= 256:
            self.flush()

    def flush(self) -> None:
        """Wait until the broker has taken every message published so far; a refusal (ACL) is an error."""
        try:
            self.transport.wait_published(self._pending, timeout_s=self.timeout_s)
        except TransportError as exc:
            raise BrokerError(str(exc)) from None
        self._pending.clear()

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.flush()
        finally:
            self.transport.stop()


def push_bundle(
    bundle_dir: Path,
    *,
    host: str,
    port: int,
    fleet: str,
    key_path: Path,
    target: Target | None = None,
    ttl: timedelta = timedelta(days=30),
    protocol: str = "5",
    canary_percent: float | None = None,
    artifact_url: str | None = None,
    verify: bool = True,
    security: MqttSecurity | None = None,
    topic_root: str | None = None,
    gc: bool = True,
) -> PushResult:
    """Publish every chunk of ``bundle_dir`` and then a signed release pointing at its manifest.

    With ``artifact_url`` (where ``bundle_dir`` is served over http(s)), only the release goes to
    the broker; devices fetch the bundle from that URL.

    ``verify=False`` skips the local integrity check; only tests use it, to send a bad bundle.

    ``gc`` clears, once the new release is acknowledged, the chunks of the release it replaced on
    the same topic that no current release of the fleet needs (:mod:`cloud_trainer.releases.chunk_gc`); a
    failure there is a logged warning, never a failed push.
    """
    try:
        manifest = Manifest.read(bundle_dir)
        if verify:
            verify_bundle_files(bundle_dir, manifest)
    except ProtocolError as exc:
        raise BundleError(f"refusing to push {bundle_dir}: {exc}") from None
    key = load_private_key(key_path)
    topics = Topics(fleet=fleet) if topic_root is None else Topics(fleet=fleet, root=topic_root)
    target = target or Target(kind="fleet", name=fleet)
    if target.kind == "fleet":
        topic = topics.fleet_release(manifest.model)
    elif target.kind == "group":
        topic = topics.group_release(target.name, manifest.model)
    else:
        topic = topics.device_release(target.name, manifest.model)
    manifest_bytes = (bundle_dir / MANIFEST_NAME).read_bytes()
    chunks = sent = 0
    superseded = None
    with Publisher(host=host, port=port, protocol=protocol, security=security) as pub:
        if gc:  # note the release this push replaces (chunk_gc builds on Publisher: imported here)
            from cloud_trainer.releases.chunk_gc import SupersededChunks

            superseded = SupersededChunks.read(  # over this connection: one per identity at a time
                topic, host=host, port=port, fleet=fleet, protocol=protocol, security=security,
                topic_root=topic_root, transport=pub.transport,
            )  # fmt: skip
        manifest_sha = sha256_bytes(manifest_bytes)
        if artifact_url is None:
            for entry in manifest.files:
                for sha, data in iter_chunks(bundle_dir / safe_relative_path(entry.path)):
                    pub.publish(topics.chunk(sha), data)
                    chunks += 1
                    sent += len(data)
            pub.publish(topics.chunk(manifest_sha), manifest_bytes)
            chunks += 1
            sent += len(manifest_bytes)
        pub.flush()  # every chunk is on the broker before a device hears of the release
        now = datetime.now(timezone.utc)
        release = Release(
            fleet=fleet,
            target=target,
            model=manifest.model,
            version=manifest.version,
            sequence=next_sequence(key_path),
            manifest_sha256=manifest_sha,
            manifest_size=len(manifest_bytes),
            issued_at=now,
            expires_at=now + ttl,
            canary_percent=canary_percent,
            artifact_url=artifact_url,
        )
        pub.publish(topic, sign_release(release, key).to_bytes())
    log.info("pushed %s v%s to %s: %d chunks, %d bytes", manifest.model, manifest.version, topic, chunks, sent)
    cleared = superseded.clear() if superseded is not None else ()
    return PushResult(release=release, topic=topic, chunks=chunks, bytes=sent, chunks_cleared=len(cleared))
