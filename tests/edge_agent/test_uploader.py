"""The sample uploader against a fake transport (tests/fakemqtt.py): what leaves the outbox and when,
in milliseconds and without a broker. The same path against a real Mosquitto and agent process is
tests/end_to_end/test_sample_upload.py."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.outbox import Outbox
from edge_agent.protocol.samples import SampleBatch, SampleRecord, SamplingRules
from edge_agent.runtime import Prediction
from edge_agent.sampling import Sampler
from edge_agent.uploader import SampleUploader
from tests.fakemqtt import ACK, DROP, SILENT, FakeTransport, Sent

TOPIC = "edgeloop/v1/f/devices/dev-1/samples"


def records(n: int, *, noise: int = 0) -> list[SampleRecord]:
    """``n`` sampled records; ``noise`` adds that many incompressible hex characters to each text."""
    kept: list[SampleRecord] = []
    sampler = Sampler(rules=SamplingRules(random_rate=1.0), device="dev-1", fleet="f", model="intents",
                      sink=kept.extend, seed=1)  # fmt: skip
    prediction = Prediction(label="a", score=0.7, scores={"a": 0.7, "b": 0.3})
    texts = [f"turn on the lights {i} " + "".join(hashlib.sha256(b"%d-%d" % (i, j)).hexdigest()
             for j in range(noise // 64 + 1))[:noise] for i in range(n)]  # fmt: skip
    sampler.observe(texts, [prediction] * n, 1, task="text-classification")
    return kept


def filled_outbox(tmp_path: Path, recs: list[SampleRecord]) -> Outbox:
    box = Outbox(tmp_path / "outbox.sqlite", max_bytes=1 << 24)
    box.put([(r.id, r.model_dump_json(by_alias=True).encode()) for r in recs])
    return box


def ids_in(sent: Sent) -> list[str]:
    return [r.id for r in SampleBatch.from_bytes(sent.payload).records]


def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.fixture
def start_uploader() -> Iterator[Callable[..., SampleUploader]]:
    """Starts uploaders that look only when woken (interval 60 s) and back off for 10 ms; stops them all."""
    started: list[SampleUploader] = []

    def start(box: Outbox, transport: FakeTransport, **kw: float) -> SampleUploader:
        settings = {"interval_s": 60.0, "ack_timeout_s": 0.01, "retry_max_s": 0.01, **kw}
        uploader = SampleUploader(outbox=box, transport=transport, topic=TOPIC, device="dev-1", fleet="f",
                                  **settings)  # type: ignore[arg-type]  # fmt: skip
        uploader.start()
        started.append(uploader)
        uploader.wake()
        return uploader

    yield start
    for uploader in started:
        uploader.stop()


def test_records_leave_the_outbox_only_after_the_puback(
    tmp_path: Path, start_uploader: Callable[..., SampleUploader]
) -> None:
    recs = records(3)
    box = filled_outbox(tmp_path, recs)
    queued_at_publish: list[int] = []

    def broker(_topic: str, _payload: bytes) -> str:
        queued_at_publish.append(box.stats().queued)
        return ACK

    fake = FakeTransport(handler=broker)
    uploader = start_uploader(box, fake)
    eventually(lambda: box.stats().uploaded == 3, "the batch to be acknowledged")
    (sent,) = fake.sent
    assert (sent.topic, sent.qos, ids_in(sent)) == (TOPIC, 1, [r.id for r in recs])
    batch = SampleBatch.from_bytes(sent.payload)
    assert (batch.device, batch.fleet) == ("dev-1", "f")
    assert queued_at_publish == [3]  # still on disk while the PUBACK was awaited
    assert (box.stats().queued, uploader.batches_sent) == (0, 1)


@pytest.mark.parametrize(
    "first_answers",
    [["No matching subscribers", "Not authorized"], [SILENT], [DROP, SILENT]],
    ids=["refused", "no-puback", "connection-lost"],
)
def test_a_batch_not_taken_stays_queued_and_goes_again(
    tmp_path: Path, start_uploader: Callable[..., SampleUploader], first_answers: list[str]
) -> None:
    recs = records(4)
    box = filled_outbox(tmp_path, recs)
    answers = iter(first_answers)
    queued_at_publish: list[int] = []

    def broker(_topic: str, _payload: bytes) -> str:
        queued_at_publish.append(box.stats().queued)
        return next(answers, ACK)

    fake = FakeTransport(handler=broker)
    start_uploader(box, fake)
    sent = fake.wait_sent(lambda s: any(m.outcome == ACK for m in s))
    eventually(lambda: box.stats().queued == 0, "the outbox to empty")
    assert [m.outcome for m in sent] == [*first_answers, ACK]
    assert all(ids_in(m) == [r.id for r in recs] for m in sent)  # the same records each time
    assert queued_at_publish == [4] * len(sent)  # nothing left the outbox before the PUBACK
    stats = box.stats()
    assert (stats.uploaded, stats.dropped) == (4, 0)


def test_nothing_is_published_while_disconnected_and_a_reconnect_sends_it(
    tmp_path: Path, start_uploader: Callable[..., SampleUploader]
) -> None:
    box = filled_outbox(tmp_path, records(2))
    fake = FakeTransport(connected=False)
    connected_at_publish: list[bool] = []
    fake.handler = lambda _t, _p: connected_at_publish.append(fake.connected.is_set()) or ACK  # type: ignore[func-returns-value]
    start_uploader(box, fake)  # woken while disconnected: it looks, sees no connection, waits
    fake.connect()  # the on_connected hook wakes it (its interval is 60 s)
    eventually(lambda: box.stats().uploaded == 2, "the upload after the connect")
    assert connected_at_publish == [True]


def test_a_batch_over_the_brokers_packet_limit_is_split(
    tmp_path: Path, start_uploader: Callable[..., SampleUploader]
) -> None:
    recs = records(40, noise=300)
    box = filled_outbox(tmp_path, recs)
    fake = FakeTransport(max_packet=2048)
    start_uploader(box, fake)
    eventually(lambda: box.stats().uploaded == 40, "every record to be uploaded")
    limit = fake.max_payload(TOPIC, 1 << 20)
    assert len(fake.sent) > 1
    assert all(len(m.payload) <= limit for m in fake.sent)
    sent_ids = [i for m in fake.sent for i in ids_in(m)]
    assert sent_ids == [r.id for r in recs]  # in order, each once


def test_a_record_too_large_to_ever_travel_is_dropped_and_counted(
    tmp_path: Path, start_uploader: Callable[..., SampleUploader]
) -> None:
    box = filled_outbox(tmp_path, records(3))
    fake = FakeTransport(max_packet=200)  # less than one compressed record
    start_uploader(box, fake)
    eventually(lambda: box.stats().queued == 0, "the outbox to empty")
    assert (box.stats().dropped, box.stats().uploaded, fake.sent) == (3, 0, [])


def test_stop_leaves_unacknowledged_records_for_next_time(
    tmp_path: Path, start_uploader: Callable[..., SampleUploader]
) -> None:
    box = filled_outbox(tmp_path, records(2))
    fake = FakeTransport(handler=lambda _t, _p: SILENT)
    uploader = start_uploader(box, fake)
    fake.wait_sent(lambda s: len(s) >= 2)  # sent, not acknowledged, sent again
    uploader.stop()
    assert box.stats().queued == 2
    box.close()
    assert Outbox(tmp_path / "outbox.sqlite", max_bytes=1 << 24).stats().queued == 2  # as after a restart


def test_unreadable_records_are_dropped_and_the_rest_uploaded(
    tmp_path: Path, start_uploader: Callable[..., SampleUploader]
) -> None:
    recs = records(2)
    box = Outbox(tmp_path / "outbox.sqlite", max_bytes=1 << 24)
    box.put([("bad", b"{not a record"), *((r.id, r.model_dump_json(by_alias=True).encode()) for r in recs)])
    fake = FakeTransport()
    start_uploader(box, fake)
    eventually(lambda: box.stats().queued == 0, "the outbox to empty")
    assert [i for m in fake.sent for i in ids_in(m)] == [r.id for r in recs]
    assert (box.stats().dropped, box.stats().uploaded) == (1, 2)
