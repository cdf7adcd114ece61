"""``cloud-train collect``: a long-running collector of the fleet's samples into the sample store.

It subscribes to ``$share/<group>/{root}/{fleet}/devices/+/samples`` (an MQTT 5 shared
subscription: run several collectors with the same group and the broker splits the fleet's
batches between them) at QoS 1, with a persistent session (a fixed client id, ``clean_start``
false, a week's session expiry), so batches published while the collector is away wait on the
broker. A batch is acknowledged (manual PUBACK) only after it is stored, so a crash or a store
failure means redelivery, and the store's id index makes that harmless.
A malformed batch is logged, counted and acknowledged: a poison message must not come back forever.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_trainer.errors import BrokerError
from cloud_trainer.samples.store import SampleStore
from edge_agent.mqtt_security import MqttSecurity
from edge_agent.protocol import ProtocolError, Topics
from edge_agent.protocol.samples import SampleBatch
from edge_agent.protocol.topics import DEFAULT_ROOT
from edge_agent.transport import MqttTransport, TransportError

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600


@dataclass
class CollectorStats:
    batches: int = 0
    new_records: int = 0
    duplicates: int = 0
    malformed: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=100))
    """the latest problems, newest last"""


def default_client_id() -> str:
    """One per host: two collectors with one client id would take each other's session in turns."""
    return f"cloud-train-collect-{socket.gethostname()}"[:64]


class Collector:
    """Collects one fleet's samples into ``store``; ``start()`` then ``stop()``, or a context manager.

    Args:
        store: where samples go.
        fleet: the fleet whose devices' samples to collect.
        host, port: the broker.
        share_group: the shared-subscription group; ``None`` for a plain subscription.
        client_id: fixed, so the broker keeps this collector's session (and queued batches);
            default ``cloud-train-collect-<host name>``.
        protocol: ``"5"`` or ``"3.1.1"`` (no session expiry there; the session is kept until cleaned).
        security: TLS and credentials (the collector identity from ``cloud-train pki init``).
        topic_root: the topic prefix.
        on_batch: called after each stored batch with the stats so far (tests and progress).
    """

    def __init__(
        self,
        *,
        store: SampleStore,
        fleet: str,
        host: str,
        port: int,
        share_group: str | None = "collectors",
        client_id: str | None = None,
        protocol: str = "5",
        security: MqttSecurity | None = None,
        topic_root: str | None = None,
        on_batch: Callable[[CollectorStats], None] | None = None,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.host, self.port = host, port
        topic = Topics(fleet=fleet, root=topic_root or DEFAULT_ROOT).all_samples()
        self.topic = f"$share/{share_group}/{topic}" if share_group else topic
        self.stats = CollectorStats()
        self._on_batch = on_batch
        self._protocol = protocol
        self._transport = MqttTransport(
            host=host,
            port=port,
            client_id=client_id or default_client_id(),
            protocol=protocol,
            security=security,
            persistent_session=True,
            session_expiry_s=SESSION_EXPIRY_S,
            manual_ack=True,
        )

    def start(self, *, wait_s: float = 10.0) -> None:
        """Connect and subscribe; raise :class:`BrokerError` if that does not happen within ``wait_s``."""
        try:
            # Routed before connecting: a persistent session's queued batches arrive right after the
            # CONNACK. Renewed after every reconnect by the transport; the session may be new.
            self._transport.subscribe_messages(self.topic, self._on_message)
            self._transport.connect(timeout_s=wait_s)
            self._transport.wait_subscribed(self.topic, timeout_s=wait_s)
        except TransportError as exc:
            self._transport.stop()
            raise BrokerError(f"MQTT broker {self.host}:{self.port}: cannot collect samples: {exc}") from None
        log.info("collecting %s into %s", self.topic, self.store.root)

    def stop(self, *, end_session: bool = False) -> None:
        """Disconnect. The broker keeps the session (and queues batches for it, as one member of the
        shared group) unless ``end_session``: use that for a collector that is going away for good,
        or the broker keeps handing it its turn of the fleet's batches for the session's lifetime."""
        props = None
        if end_session and self._protocol == "5":
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        self._transport.stop(properties=props)

    def __enter__(self) -> Collector:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- the transport's network thread -------------------------------------------------------------
    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        try:
            stored = self._store(message)
        except Exception as exc:  # not acknowledged: the broker delivers it again
            self.stats.errors.append(f"{message.topic}: cannot store: {exc}")
            log.exception("cannot store a batch from %s; it stays unacknowledged", message.topic)
            return
        self._transport.ack(message)
        if stored and self._on_batch is not None:
            self._on_batch(self.stats)

    def _store(self, message: mqtt.MQTTMessage) -> bool:
        """Store one batch, all of it or none; False if it is refused (counted as malformed).

        Every record is checked before anything is stored (:meth:`SampleBatch.from_bytes`: finite
        numbers, real times, names and labels by pattern, sizes); one bad record refuses the batch.
        A batch the store cannot take for good (a constraint, a value Parquet cannot hold) is
        refused too, with nothing stored; any other store failure raises and the batch stays
        unacknowledged.
        """
        try:
            batch = SampleBatch.from_bytes(bytes(message.payload))
        except ProtocolError as exc:
            return self._refuse(message, str(exc), "a malformed batch")
        device = message.topic.split("/")[-2]
        claims = {batch.device, *(r.device for r in batch.records)}, {batch.fleet, *(r.fleet for r in batch.records)}
        if claims != ({device}, {self.fleet}):
            return self._refuse(message, "records claim another device or fleet", "a batch")
        try:
            result = self.store.add_batch(batch)
        except (ValueError, UnicodeError, sqlite3.IntegrityError) as exc:  # never storable: take it off the broker
            return self._refuse(message, f"cannot be stored: {exc}", "a batch that cannot be stored")
        self.stats.batches += 1
        self.stats.new_records += result.new_records
        self.stats.duplicates += result.duplicates
        log.info("batch from %s: %d new, %d already stored", device, result.new_records, result.duplicates)
        return True

    def _refuse(self, message: mqtt.MQTTMessage, problem: str, what: str) -> bool:
        self.stats.malformed += 1
        self.stats.errors.append(f"{message.topic}: {problem}")
        log.error("dropped %s on %s: %s", what, message.topic, problem)
        return False
