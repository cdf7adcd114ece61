"""Publishing a bundle to a fleet: chunks first, then the signed release, all retained."""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud_trainer.errors import BrokerError, BundleError
from cloud_trainer.signing import load_private_key, next_sequence, sign_release
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
from edge_agent.transport import protocol_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    release: Release
    topic: str
    chunks: int
    bytes: int


class Publisher:
    """A short-lived MQTT connection for publishing; a context manager.

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
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol_version(protocol),
        )
        self._client.max_inflight_messages_set(64)
        if security is not None:
            security.apply(self._client)
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._pending: list[mqtt.MQTTMessageInfo] = []

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
        self._connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if not self._connected.is_set():  # closed before CONNACK: a TLS or authentication failure
            self._refused = f"{reason} before accepting us (credentials missing, wrong or revoked?)"
            self._connected.set()

    def __enter__(self) -> Publisher:
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except ssl.SSLError as exc:
            raise BrokerError(f"TLS with MQTT broker {self.host}:{self.port} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise BrokerError(f"cannot reach MQTT broker {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._client.loop_start()
        if not self._connected.wait(self.timeout_s):
            self._client.loop_stop()
            raise BrokerError(f"MQTT broker {self.host}:{self.port} did not answer within {self.timeout_s:g}s")
        if self._refused:
            self._client.loop_stop()
            raise BrokerError(f"MQTT broker {self.host}:{self.port} refused the connection: {self._refused}")
        return self

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        self._pending.append(info)
        if len(self._pending) >= 256:
            self.flush()

    def flush(self) -> None:
        for info in self._pending:
            try:
                info.wait_for_publish(timeout=self.timeout_s)
            except RuntimeError as exc:
                raise BrokerError(f"broker connection lost while publishing: {exc}") from None
            if not info.is_published():
                raise BrokerError(
                    f"broker {self.host}:{self.port} did not acknowledge a message in {self.timeout_s:g}s"
                )
        self._pending.clear()

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.flush()
        finally:
            self._client.disconnect()
            self._client.loop_stop()


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
) -> PushResult:
    """Publish every chunk of ``bundle_dir`` and then a signed release pointing at its manifest.

    With ``artifact_url`` (where ``bundle_dir`` is served over http(s)), only the release goes to
    the broker; devices fetch the bundle from that URL.

    ``verify=False`` skips the local integrity check; only tests use it, to send a bad bundle.
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
    with Publisher(host=host, port=port, protocol=protocol, security=security) as pub:
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
    return PushResult(release=release, topic=topic, chunks=chunks, bytes=sent)
