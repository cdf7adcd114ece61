"""The collector's gate and the store's promise (issue 13): every record is checked before
anything is stored, a bad one refuses its whole batch, and the Parquet parts and the index agree
after any failure or crash, which ``cloud-train samples verify`` proves.

Crashes are real: a child process is killed with SIGKILL inside ``add_batch``, and a collector
process is killed with SIGKILL mid-batch while it collects from a real Mosquitto.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from cloud_trainer.cli import main as cloud_train
from cloud_trainer.demo.localbroker import LocalBroker
from cloud_trainer.releases.publish import Publisher
from cloud_trainer.samples.collect import Collector
from cloud_trainer.samples.store import SampleStore
from edge_agent.protocol import Topics
from edge_agent.protocol.errors import MalformedPayload
from edge_agent.protocol.samples import (
    MAX_RECORDS,
    MAX_TEXT_CHARS,
    SampleBatch,
    SampleRecord,
    SamplingRules,
    utc_timestamp,
)
from edge_agent.runtime import Prediction
from edge_agent.sampling import Sampler

BAD_NUMBERS = ["NaN", "Infinity", "-Infinity"]
BAD_TIMES = ["2026-01-01T/../../x", "2026-13-45T00:00:00Z", "1970-01-01T00:00:00Z", "3000-01-01T00:00:00Z"]


def records(n: int, *, fleet: str = "f", device: str = "dev-1", start: int = 0) -> list[SampleRecord]:
    """Records exactly as the agent's sampler makes them."""
    kept: list[SampleRecord] = []
    sampler = Sampler(rules=SamplingRules(random_rate=1.0), device=device, fleet=fleet, model="intents",
                      sink=kept.extend, seed=1)  # fmt: skip
    scores = {"lights_on": 0.7, "lights_off": 0.3}
    prediction = Prediction(label="lights_on", score=0.7, scores=scores)
    sampler.observe([f"text {start + i}" for i in range(n)], [prediction] * n, 1, task="text-classification")
    return kept


def batch_of(recs: list[SampleRecord], fleet: str = "f") -> SampleBatch:
    return SampleBatch(device=recs[0].device, fleet=fleet, sent_at="2026-11-25T00:00:00Z", records=recs)


def wire(batch: SampleBatch) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(batch.model_dump_json(by_alias=True))
    return data


def tampered(batch: SampleBatch, field: str, literal: str, *, record: int = 1) -> bytes:
    """The batch as gzip JSON with one field of one record (or of the batch, ``record=-1``) replaced
    by a raw JSON literal: ``NaN`` and ``Infinity`` are not JSON, but Python's json module takes them."""
    data = wire(batch)
    target = data if record < 0 else data["records"][record]
    target[field] = "@@HERE@@"
    text = json.dumps(data).replace('"@@HERE@@"', literal)
    return gzip.compress(text.encode())


def parquet_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "data").rglob("*") if p.is_file())


def snapshot(store: SampleStore) -> tuple[dict[str, int], list[Path]]:
    return store.counts(), parquet_files(store.root)


def verify(store: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cloud_train(["samples", "verify", "--store", str(store), *extra])
    return code, capsys.readouterr().out


# -- the wire contract ------------------------------------------------------------------------------
def test_the_agents_own_records_pass_unchanged() -> None:
    recs = records(3)
    batch = batch_of(recs)
    again = SampleBatch.from_bytes(batch.to_bytes())
    assert again == batch
    assert [r.created_at for r in again.records] == [r.created_at for r in recs]
    for record in again.records:  # the sampler's format: milliseconds, UTC
        assert record.created_at.endswith("+00:00") and len(record.created_at) == len("2026-11-25T10:00:01.123+00:00")


@pytest.mark.parametrize("literal", BAD_NUMBERS)
@pytest.mark.parametrize("field", ["score", "scores"])
def test_nan_and_infinities_refuse_the_whole_batch(field: str, literal: str) -> None:
    batch = batch_of(records(3))
    value = literal if field == "score" else f'{{"lights_on": {literal}, "lights_off": 0.3}}'
    with pytest.raises(MalformedPayload, match=rf"records\.1\.{field}.*finite number"):
        SampleBatch.from_bytes(tampered(batch, field, value))


@pytest.mark.parametrize("when", BAD_TIMES)
def test_timestamps_that_are_not_real_times_refuse_the_whole_batch(when: str) -> None:
    batch = batch_of(records(3))
    with pytest.raises(MalformedPayload, match=r"records\.1\.created_at"):
        SampleBatch.from_bytes(tampered(batch, "created_at", json.dumps(when)))
    with pytest.raises(MalformedPayload, match=r"sent_at"):
        SampleBatch.from_bytes(tampered(batch, "sent_at", json.dumps(when), record=-1))


def test_timestamps_are_normalised_to_utc_so_the_day_partition_is_real() -> None:
    assert utc_timestamp("2026-11-25T10:00:01.123+00:00") == "2026-11-25T10:00:01.123+00:00"  # the agent's
    assert utc_timestamp("2026-11-25T10:00:01Z") == "2026-11-25T10:00:01.000+00:00"
    assert utc_timestamp("2026-11-26T01:30:00.5+02:00") == "2026-11-25T23:30:00.500+00:00"
    assert utc_timestamp("2026-11-25T10:00:01.123456-00:30") == "2026-11-25T10:30:01.123456+00:00"
    for bad in [*BAD_TIMES, "2026-11-25T10:00:01", "2026-11-25 10:00:01Z", "2026-02-30T00:00:00Z",
                "2026-11-25T24:00:00Z", "2026-11-25T10:00:01+24:00", "２０２６-11-25T10:00:01Z"]:  # fmt: skip
        with pytest.raises(ValueError, match=r"RFC 3339|not a real time|not between"):
            utc_timestamp(bad)


@pytest.mark.parametrize(
    ("field", "literal", "where"),
    [
        ("predicted", '"lights\\u001b[2J"', r"records\.1\.predicted"),
        ("predicted", '""', r"records\.1\.predicted"),
        ("label", json.dumps("x" * 101), r"records\.1\.label"),
        ("scores", '{"a\\nb": 0.5}', r"records\.1\.scores"),
        ("scores", "{}", r"records\.1\.scores"),
        ("scores", '{"a": 1.5}', r"records\.1\.scores\.a"),
        ("score", "-0.1", r"records\.1\.score"),
        ("score", '"0.5"', r"records\.1\.score"),
        ("version", str(2**31), r"records\.1\.version"),
        ("version", "true", r"records\.1\.version"),
        ("reasons", '["random", "random"]', r"records\.1\.reasons"),
        ("reasons", '["bored"]', r"records\.1\.reasons"),
        ("model", '"../../x"', r"records\.1\.model"),
        ("image", "[[0, 1]]", r"records\.1.*exactly one input"),
        ("text", "null", r"records\.1.*exactly one input"),
        ("kind", '"feedback"', r"records\.1.*true label"),
    ],
)
def test_names_labels_and_shapes_are_checked(field: str, literal: str, where: str) -> None:
    batch = batch_of(records(3))
    with pytest.raises(MalformedPayload, match=where):
        SampleBatch.from_bytes(tampered(batch, field, literal))


@pytest.mark.parametrize(
    ("image", "problem"),
    [("[[0, NaN]]", "not finite"), ("[[0, Infinity]]", "not finite"), ('[[0, "1"]]', "str where a number"),
     ("[[0, true]]", "bool where a number"), ("[[[[[0]]]]]", "nested deeper"), ("[[]]", "empty list")],
)  # fmt: skip
def test_images_are_nested_lists_of_finite_numbers(image: str, problem: str) -> None:
    batch = batch_of(records(2))
    data = wire(batch)
    data["records"][1].update(text=None, image="@@HERE@@")
    payload = json.dumps(data).replace('"@@HERE@@"', image).encode()
    with pytest.raises(MalformedPayload, match=rf"records\.1\.image.*{problem}"):
        SampleBatch.from_bytes(payload)
    data["records"][1]["image"] = [[0, 255], [17, 3]]
    assert SampleBatch.from_bytes(json.dumps(data).encode()).records[1].image == [[0, 255], [17, 3]]


def test_sizes_are_bounded_on_the_wire() -> None:
    (one,) = records(1)
    huge = one.model_copy(update={"text": "x" * (MAX_TEXT_CHARS + 1)})  # made on a device: its writer drops it
    with pytest.raises(MalformedPayload, match=r"records\.1: text has 49153 characters"):
        SampleBatch.from_bytes(batch_of([one, huge]).to_bytes())
    wide = SampleRecord.model_validate({**one.model_dump(by_alias=True), "text": "y" * 40_000,
                                        "scores": {f"c{i}": 0.0 for i in range(1000)}})  # fmt: skip
    with pytest.raises(MalformedPayload, match=r"records\.0: the record is \d+ bytes of JSON"):
        SampleBatch.from_bytes(batch_of([wide]).to_bytes())
    data = wire(batch_of([one]))
    data["records"] = data["records"] * (MAX_RECORDS + 1)
    with pytest.raises(MalformedPayload, match=f"{MAX_RECORDS + 1} records; at most {MAX_RECORDS}"):
        SampleBatch.from_bytes(gzip.compress(json.dumps(data).encode()))


# -- the store: all or nothing ------------------------------------------------------------------------
def test_a_failure_while_indexing_leaves_neither_parquet_nor_index_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SampleStore(tmp_path / "store")
    store.add_batch(batch_of(records(2)))
    before = snapshot(store)
    calls = []
    original = SampleStore._index

    def failing(self: SampleStore, record: SampleRecord) -> None:
        calls.append(record.id)
        if len(calls) == 2:  # the first record's rows are in the transaction already
            raise OSError("disk full")
        original(self, record)

    monkeypatch.setattr(SampleStore, "_index", failing)
    with pytest.raises(OSError, match="disk full"):
        store.add_batch(batch_of(records(3, start=10)))
    assert snapshot(store) == before
    monkeypatch.undo()
    assert store.add_batch(batch_of(records(3, start=10))).new_records == 3  # nothing half-stored blocks it
    assert verify(tmp_path / "store", capsys=capsys) == (0, "verify: 2 parts, 5 records, 5 samples: Parquet and "
                                                            "the index agree\n")  # fmt: skip


def test_a_failure_writing_the_second_part_removes_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SampleStore(tmp_path / "store")
    (first,) = records(1)
    other_day = first.model_copy(update={"id": "e" * 32, "prediction_id": "e" * 32,
                                         "created_at": "2026-11-20T08:00:00.000+00:00"})  # fmt: skip
    original = SampleStore._write_part
    written: list[Path] = []

    def second_fails(self: SampleStore, directory: Path, group: list[SampleRecord]) -> Any:
        if written:
            raise OSError("no space left on device")
        part = original(self, directory, group)
        written.append(self.root / part.path)
        return part

    monkeypatch.setattr(SampleStore, "_write_part", second_fails)
    with pytest.raises(OSError, match="no space"):
        store.add_batch(batch_of([first, other_day]))
    assert written and not written[0].exists()
    assert parquet_files(store.root) == []
    assert store.counts() == {"samples": 0, "labelled": 0, "records_received": 0}


CRASH_IN_ADD_BATCH = """
import os, signal, sys
from pathlib import Path
from cloud_trainer.samples.store import SampleStore
from edge_agent.protocol.samples import SampleBatch

store = SampleStore(Path(sys.argv[1]))
where = sys.argv[3]
original = SampleStore._index
seen = []

def die(*_args):
    os.kill(os.getpid(), signal.SIGKILL)

def die_on_second(self, record):
    seen.append(record)
    if len(seen) == 2:
        die()
    original(self, record)

if where == "before-commit":
    SampleStore._index_parts = die
else:
    SampleStore._index = die_on_second
store.add_batch(SampleBatch.from_bytes(Path(sys.argv[2]).read_bytes()))
print("not killed")
"""


@pytest.mark.parametrize("where", ["before-commit", "inside-the-transaction"])
def test_kill_9_inside_add_batch_leaves_only_an_orphan_part_that_verify_reports_and_fix_removes(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    store = SampleStore(root)
    store.add_batch(batch_of(records(2)))
    before = snapshot(store)
    store.close()
    batch = batch_of(records(3, start=10))
    (tmp_path / "batch.gz").write_bytes(batch.to_bytes())

    child = subprocess.run([sys.executable, "-c", CRASH_IN_ADD_BATCH, str(root), str(tmp_path / "batch.gz"), where],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr

    store = SampleStore(root)  # a reader: leaves the orphan alone, sees only what was indexed
    assert store.counts() == before[0]
    assert len(parquet_files(root)) == len(before[1]) + 1
    assert len(store.parquet_files()) == 1
    check = store.verify()
    assert (check.problems, len(check.orphans)) == ((), 1)
    code, out = verify(root, capsys=capsys)
    assert code == 1
    assert f"orphan part: {check.orphans[0]}" in out
    assert out.endswith("verify: 1 parts, 2 records, 2 samples: 0 problems, 1 orphan parts (--fix removes them)\n")

    code, out = verify(root, "--fix", capsys=capsys)
    assert code == 0, out
    assert f"removed orphan part {check.orphans[0]}" in out
    assert "Parquet and the index agree (1 orphan parts removed)" in out
    assert parquet_files(root) == before[1]
    assert store.add_batch(batch).new_records == 3  # the broker would deliver it again
    assert store.verify().agrees


def test_verify_reports_a_deleted_part_and_fix_does_not_hide_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    store = SampleStore(root)
    store.add_batch(batch_of(records(2)))
    store.add_batch(batch_of(records(3, start=10)))
    assert verify(root, capsys=capsys)[0] == 0
    gone = store.parquet_files()[0]
    gone.unlink()
    relative = str(gone.relative_to(root))
    code, out = verify(root, "--fix", capsys=capsys)
    assert code == 1
    assert f"problem: {relative}: missing (" in out
    assert "samples rows have no record in the parts that could be read" in out
    assert "verify: 2 parts, 5 records, 5 samples: 2 problems, 0 orphan parts" in out


def test_verify_finds_what_the_old_insert_or_ignore_left_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store written before this fix: a NaN record in Parquet and ``received`` but no ``samples``
    row (and no ``received.part`` column yet)."""
    import sqlite3

    root = tmp_path / "store"
    store = SampleStore(root)
    recs = records(3)
    store.add_batch(batch_of(recs))
    store.close()
    db = sqlite3.connect(root / "index.sqlite")
    db.execute("DELETE FROM samples WHERE prediction_id = ?", (recs[1].prediction_id,))
    db.execute("ALTER TABLE received DROP COLUMN part")
    db.commit()
    db.close()

    code, out = verify(root, capsys=capsys)
    assert code == 1
    assert f"prediction {recs[1].prediction_id}: its records are in Parquet but it has no samples row" in out
    columns = [row[1] for row in sqlite3.connect(root / "index.sqlite").execute("PRAGMA table_info(received)")]
    assert columns == ["id", "part"]  # migrated on open


def test_verify_reports_a_part_that_holds_other_records_than_the_index_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq

    root = tmp_path / "store"
    store = SampleStore(root)
    store.add_batch(batch_of(records(3)))
    (part,) = store.parquet_files()
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 2), part)  # one record lost from the file
    code, out = verify(root, capsys=capsys)
    assert code == 1
    assert f"{part.relative_to(root)}: holds 2 records; the index says 3" in out
    assert "but in no part file" in out


# -- the collector ------------------------------------------------------------------------------------
def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_collector_refuses_bad_batches_whole_and_stores_nothing_of_them(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str
) -> None:
    store = SampleStore(tmp_path / "store", collector=True)
    collector = Collector(store=store, fleet=fleet, host=mosquitto.host, port=mosquitto.port, share_group=None,
                          client_id=f"collect-{fleet}"[:64])  # fmt: skip
    collector.start()
    topic = Topics(fleet=fleet).device_samples("dev-1")
    template = batch_of(records(3, fleet=fleet), fleet=fleet)
    bad = [tampered(template, "score", literal) for literal in BAD_NUMBERS]
    bad += [tampered(template, "created_at", json.dumps(when)) for when in BAD_TIMES]
    bad += [tampered(template, "sent_at", json.dumps(BAD_TIMES[0]), record=-1)]
    good = batch_of(records(2, fleet=fleet, start=100), fleet=fleet)
    try:
        with Publisher(host=mosquitto.host, port=mosquitto.port, client_id=f"pub-{fleet}"[:64]) as pub:
            for payload in bad:
                pub.publish(topic, payload, retain=False)
            pub.publish(topic, good.to_bytes(), retain=False)
        wait_until(lambda: collector.stats.batches == 1, "the good batch")
    finally:
        collector.stop(end_session=True)
    assert collector.stats.malformed == len(bad)
    errors = list(collector.stats.errors)
    assert all("records.1." in e or "sent_at" in e for e in errors), errors
    assert {s.prediction_id for s in store.query()} == {r.prediction_id for r in good.records}
    assert store.counts() == {"samples": 2, "labelled": 0, "records_received": 2}
    assert len(store.parquet_files()) == len(parquet_files(store.root)) == 1
    assert store.verify().agrees


COLLECTOR_THAT_HANGS_MID_BATCH = """
import sys, time
from pathlib import Path
from cloud_trainer.samples.collect import Collector
from cloud_trainer.samples.store import SampleStore

root, host, port, fleet, client_id, marker, hang_at = sys.argv[1:]
calls = []
original = SampleStore._index_parts

def slow(self, parts):
    calls.append(parts)
    if len(calls) == int(hang_at):  # its Parquet is written; its index commit is not
        Path(marker).write_text("\\n".join(p.path for p in parts))
        time.sleep(120)
    original(self, parts)

SampleStore._index_parts = slow
store = SampleStore(Path(root), collector=True)
collector = Collector(store=store, fleet=fleet, host=host, port=int(port), share_group=None, client_id=client_id)
collector.start()
Path(marker + ".ready").write_text("subscribed")
time.sleep(120)
"""


def test_collector_killed_mid_batch_then_restarted_and_verify_says_they_agree(
    tmp_path: Path, mosquitto: LocalBroker, fleet: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root, marker = tmp_path / "store", tmp_path / "hanging"
    client_id = f"collect-{fleet}"[:64]
    topic = Topics(fleet=fleet).device_samples("dev-1")
    batches = [batch_of(records(4, fleet=fleet, start=10 * i), fleet=fleet) for i in range(6)]
    args = [str(root), mosquitto.host, str(mosquitto.port), fleet, client_id, str(marker), "3"]
    log = (tmp_path / "collector.log").open("w")
    child = subprocess.Popen([sys.executable, "-c", COLLECTOR_THAT_HANGS_MID_BATCH, *args], stdout=log,
                             stderr=subprocess.STDOUT)  # fmt: skip
    try:
        ready = tmp_path / "hanging.ready"
        wait_until(lambda: ready.exists() or child.poll() is not None, "the collector to subscribe", 30)
        assert child.poll() is None, (tmp_path / "collector.log").read_text()
        with Publisher(host=mosquitto.host, port=mosquitto.port, client_id=f"pub-{fleet}"[:64]) as pub:
            for batch in batches:
                pub.publish(topic, batch.to_bytes(), retain=False)
        wait_until(marker.exists, "the collector to hang between its Parquet write and its index commit", 60)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()

    hung = marker.read_text().splitlines()
    code, out = verify(root, capsys=capsys)
    assert code == 1, out
    assert [line for line in out.splitlines() if line.startswith("problem")] == []
    assert [f"orphan part: {path} (written, never indexed: a crash's leftover)" for path in hung] == [
        line for line in out.splitlines() if line.startswith("orphan")
    ]
    assert "verify: 2 parts, 8 records, 8 samples" in out  # two batches were stored before the kill

    store = SampleStore(root, collector=True)  # restarted: the leftover goes, the broker delivers again
    assert store.verify().orphans == ()
    collector = Collector(store=store, fleet=fleet, host=mosquitto.host, port=mosquitto.port, share_group=None,
                          client_id=client_id)  # fmt: skip
    collector.start()
    probe = batch_of(records(1, fleet=fleet, start=900), fleet=fleet)
    try:
        wait_until(lambda: store.counts()["records_received"] == 24, "every batch after the restart", 60)
        # A probe batch published now arrives after any redelivery still on its way (one topic,
        # QoS 1: in order), so once it is stored nothing else is coming.
        with Publisher(host=mosquitto.host, port=mosquitto.port, client_id=f"pub-{fleet}"[:64]) as pub:
            pub.publish(topic, probe.to_bytes(), retain=False)
        wait_until(lambda: store.counts()["records_received"] == 25, "the probe batch", 60)
    finally:
        collector.stop(end_session=True)
    code, out = verify(root, capsys=capsys)
    assert (code, out) == (0, "verify: 7 parts, 25 records, 25 samples: Parquet and the index agree\n")
    table = ds.dataset(root / "data", format="parquet", partitioning="hive").to_table()
    stored = table.column("id").to_pylist()
    expected = [r.id for b in [*batches, probe] for r in b.records]
    assert sorted(stored) == sorted(expected)  # each once: none lost, none twice
    assert collector.stats.malformed == 0
