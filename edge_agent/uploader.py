"""Moving samples from the request path to the cloud: into the outbox, then up to the broker.

:class:`SampleWriter` takes kept records from the sampler (request path, never blocks) and writes
them to the :class:`~edge_agent.outbox.Outbox` on its own thread, many per transaction.

:class:`SampleUploader` sends what the outbox holds in batches: gzip-compressed
:class:`~edge_agent.protocol.samples.SampleBatch` messages under the 96 KiB batch limit, at QoS 1;
records leave the outbox only after the broker's PUBACK. While the broker is away it waits; a
batch that is not acknowledged in time is sent again later, with back-off (the cloud stores each
record id once, so a repeat is harmless).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Protocol

from edge_agent.outbox import Outbox, OutboxItem
from edge_agent.protocol.samples import MAX_BATCH_BYTES, SampleBatch, SampleRecord
from edge_agent.transport import TransportError

log = logging.getLogger(__name__)


class PublishReceipt(Protocol):
    """What :meth:`UploadTransport.publish` returns (paho's ``MQTTMessageInfo`` is one)."""

    @property
    def mid(self) -> int: ...

    def wait_for_publish(self, timeout: float | None = None) -> None: ...

    def is_published(self) -> bool: ...


class UploadTransport(Protocol):
    """The part of :class:`~edge_agent.transport.MqttTransport` the uploader uses; tests pass a fake."""

    @property
    def connected(self) -> threading.Event: ...

    def on_connected(self, hook: Callable[[], None]) -> None: ...

    def max_payload(self, topic: str, default: int) -> int: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> PublishReceipt: ...

    def refusal(self, mid: int) -> str | None: ...


class SampleWriter:
    """A thread that writes kept records to the outbox, grouping whatever is waiting into one commit.

    Args:
        outbox: where records go.
        on_written: called after each commit (the uploader is woken by it).
        capacity: records waiting in memory at most; past it new ones are dropped and counted.
    """

    def __init__(self, *, outbox: Outbox, on_written: Callable[[], None], capacity: int = 10_000) -> None:
        self._outbox = outbox
        self._on_written = on_written
        self._queue: queue.Queue[list[SampleRecord] | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="sample-writer", daemon=True)

    def submit(self, records: list[SampleRecord]) -> None:
        try:
            self._queue.put_nowait(records)
        except queue.Full:
            self._outbox.count_lost(len(records))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write what is waiting, then stop."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)

    def _write(self, records: list[SampleRecord]) -> None:
        rows = []
        for record in records:
            try:  # a lone surrogate cannot be serialised; a NaN score is, and the uploader drops it
                body = record.model_dump_json(by_alias=True).encode()
            except ValueError as exc:
                log.warning("sample %s cannot be stored and is dropped: %s", record.id, exc)
                self._outbox.count_lost(1)
                continue
            if len(body) > MAX_BATCH_BYTES // 2:  # it could never travel (a huge image): say so now
                log.warning("sample %s is %d bytes, too large to upload; dropped", record.id, len(body))
                self._outbox.count_lost(1)
                continue
            rows.append((record.id, body))
        try:
            self._outbox.put(rows)
        except Exception:  # the writer must outlive any one failure
            log.exception("cannot write %d samples to the outbox", len(rows))
            self._outbox.count_lost(len(rows))
            return
        self._on_written()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batches = [first]
            while len(batches) < 256:
                try:
                    batches.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = [r for batch in batches if batch is not None for r in batch]
            if records:
                self._write(records)
            if any(batch is None for batch in batches):
                return


class SampleUploader:
    """A thread that uploads the outbox over MQTT.

    Args:
        outbox: the durable queue.
        transport: the agent's MQTT connection (an :class:`UploadTransport`).
        topic: ``.../devices/{device}/samples``.
        device, fleet: written into each batch.
        batch_records: records per message at most (fewer when the compressed size needs it).
        interval_s: how often to look when not woken.
        ack_timeout_s: how long to wait for a PUBACK before sending the batch again later.
        retry_max_s: the longest back-off between attempts.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        transport: UploadTransport,
        topic: str,
        device: str,
        fleet: str,
        batch_records: int = 200,
        interval_s: float = 5.0,
        ack_timeout_s: float = 10.0,
        retry_max_s: float = 60.0,
    ) -> None:
        self._outbox = outbox
        self._transport = transport
        self._topic = topic
        self._device, self._fleet = device, fleet
        self._batch_records = batch_records
        self._interval_s = interval_s
        self._ack_timeout_s = ack_timeout_s
        self._retry_max_s = retry_max_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sample-uploader", daemon=True)
        self.batches_sent = 0

    def start(self) -> None:
        self._transport.on_connected(self.wake)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=2)  # a batch still waiting for its PUBACK stays queued: sent next time

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        delay = 0.0  # the back-off after failures; grows until a batch goes through
        while not self._stop.is_set():
            if delay:
                self._stop.wait(delay)  # backing off: new samples do not cut it short
            else:
                self._wake.wait(self._interval_s)
            self._wake.clear()
            while not self._stop.is_set() and self._transport.connected.is_set():
                items = self._outbox.peek(max_items=self._batch_records)
                if not items:
                    break
                try:
                    sent = self._send(items)
                except Exception as exc:  # noqa: BLE001 - the uploader must outlive any one failure
                    log.warning("sample upload failed, will retry: %s", exc)
                    sent = False
                if not sent:
                    delay = min(self._retry_max_s, max(1.0, delay * 2))
                    break
                delay = 0.0

    def _send(self, items: list[OutboxItem]) -> bool:
        parsed = self._readable(items)
        if not parsed:
            return True
        limit = self._transport.max_payload(self._topic, MAX_BATCH_BYTES)  # the broker may take less
        payload = self._encode([record for _, record in parsed])
        while len(payload) > limit and len(parsed) > 1:
            parsed = parsed[: len(parsed) // 2]
            payload = self._encode([record for _, record in parsed])
        items = [item for item, _ in parsed]
        if len(payload) > limit:  # one record alone too large: it can never travel
            log.warning("sample %s is %d bytes compressed, over the %d limit; dropped", items[0].id, len(payload),
                        limit)  # fmt: skip
            self._outbox.discard(items)
            return True
        info = self._transport.publish(self._topic, payload, qos=1)
        try:
            info.wait_for_publish(timeout=self._ack_timeout_s)
        except (RuntimeError, ValueError) as exc:  # not queued: the connection dropped meanwhile
            raise TransportError(str(exc)) from None
        if not info.is_published():
            log.info("no PUBACK for a batch of %d samples within %.0fs; will send again", len(items),
                     self._ack_timeout_s)  # fmt: skip
            return False
        refusal = self._transport.refusal(info.mid)
        if refusal is not None:  # kept: nobody would store it (no collector yet), or not allowed
            log.warning("broker did not take a batch of %d samples (%s); will send again", len(items), refusal)
            return False
        self._outbox.ack(items)
        self.batches_sent += 1
        log.debug("uploaded %d samples (%d bytes)", len(items), len(payload))
        return True

    def _readable(self, items: list[OutboxItem]) -> list[tuple[OutboxItem, SampleRecord]]:
        """The items whose bodies still parse; any other is dropped (counted), never left to block the queue."""
        good, bad = [], []
        for item in items:
            try:
                good.append((item, SampleRecord.model_validate_json(item.body)))
            except ValueError:
                bad.append(item)
        if bad:
            log.warning("dropping %d unreadable samples from the outbox", len(bad))
            self._outbox.discard(bad)
        return good

    def _encode(self, records: list[SampleRecord]) -> bytes:
        batch = SampleBatch(
            device=self._device,
            fleet=self._fleet,
            sent_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            records=records,
        )
        return batch.to_bytes()
