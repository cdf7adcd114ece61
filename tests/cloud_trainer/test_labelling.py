"""The cloud's side of the sample path on its own: the sample store (each record once, Parquet that
pyarrow, pandas and datasets read) and labelling (CSV and Label Studio out and in). The device's side
is tests/edge_agent/test_sampling.py; both with a real broker and agent: tests/end_to_end/."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from cloud_trainer.errors import DataError
from cloud_trainer.samples.labelling import export_csv, export_label_studio, labelled_texts, read_labels
from cloud_trainer.samples.store import SampleStore, SampleStoreError
from edge_agent.protocol.samples import SampleBatch, SampleRecord, SamplingRules
from edge_agent.runtime import Prediction
from edge_agent.sampling import Sampler


def prediction(scores: dict[str, float]) -> Prediction:
    label = max(scores, key=scores.__getitem__)
    return Prediction(label=label, score=scores[label], scores=scores)


def records(n: int, *, device: str = "dev-1") -> list[SampleRecord]:
    kept: list[SampleRecord] = []
    sampler = Sampler(rules=SamplingRules(random_rate=1.0), device=device, fleet="f", model="intents",
                      sink=kept.extend, seed=1)  # fmt: skip
    sampler.observe(
        [f"text {i}" for i in range(n)], [prediction({"a": 0.7, "b": 0.3})] * n, 1, task="text-classification"
    )
    return kept


def batch_of(recs: list[SampleRecord]) -> SampleBatch:
    return SampleBatch(device=recs[0].device, fleet="f", sent_at="2026-11-25T00:00:00+00:00", records=recs)


def test_store_keeps_each_record_once_in_parquet_that_pyarrow_reads(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "store")
    recs = records(5)
    assert store.add_batch(batch_of(recs)).new_records == 5
    again = store.add_batch(batch_of(recs[3:] + records(2)))  # at-least-once: a batch sent twice, plus new ones
    assert (again.new_records, again.duplicates) == (2, 2)
    assert store.counts() == {"samples": 7, "labelled": 0, "records_received": 7}
    table = ds.dataset(tmp_path / "store" / "data", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 7
    assert set(table.column("model").to_pylist()) == {"intents"}
    assert sorted(table.column("text").to_pylist())[:1] == ["text 0"]
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "store" / "data")
    assert len(frame) == 7 and set(frame["model"]) == {"intents"}
    from datasets import load_dataset

    files = [str(p) for p in (tmp_path / "store" / "data").rglob("*.parquet")]
    loaded = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.num_rows == 7 and "text" in loaded.column_names


def test_store_removes_a_part_that_was_written_but_never_indexed(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "store")
    store.add_batch(batch_of(records(2)))
    day = next((tmp_path / "store" / "data" / "model=intents").iterdir())
    orphan = day / "part-crashed.parquet"
    orphan.write_bytes(b"half")
    (day / ".part-crashed2.tmp").write_bytes(b"half")
    store.close()
    SampleStore(tmp_path / "store")  # a reader leaves the collector's parts alone
    assert orphan.exists()
    SampleStore(tmp_path / "store", collector=True)
    assert not orphan.exists() and not (day / ".part-crashed2.tmp").exists()
    assert len(list(day.iterdir())) == 1


def test_device_feedback_labels_a_stored_sample(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "store")
    kept: list[SampleRecord] = []
    sampler = Sampler(rules=SamplingRules(random_rate=1.0), device="dev-1", fleet="f", model="intents",
                      sink=kept.extend, seed=1)  # fmt: skip
    (pid,) = sampler.observe(["dim the lights"], [prediction({"a": 0.7, "b": 0.3})], 1, task="text-classification")
    store.add_batch(batch_of(kept[:1]))
    feedback = sampler.feedback(pid, "lights_dim")
    store.add_batch(batch_of([feedback]))
    stored = store.get(pid)
    assert (stored.label, stored.label_source) == ("lights_dim", "device")
    assert "feedback" in stored.reasons


def test_export_and_import_labels_as_csv_and_label_studio(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "store")
    store.add_batch(batch_of(records(3)))
    unlabelled = store.query(model="intents", labelled=False)
    assert export_csv(unlabelled, tmp_path / "todo.csv") == 3
    rows = list(csv.DictReader((tmp_path / "todo.csv").open()))
    assert [r["label"] for r in rows] == ["", "", ""]
    rows[0]["label"], rows[1]["label"] = "lights_on", "lights_off"
    with (tmp_path / "done.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert store.set_labels(read_labels(tmp_path / "done.csv")) == 2
    assert store.counts()["labelled"] == 2

    export_label_studio(store.query(labelled=False), tmp_path / "ls.json")
    tasks = json.loads((tmp_path / "ls.json").read_text())
    assert tasks[0]["data"]["text"] == rows[2]["text"]
    tasks[0]["annotations"] = [{"result": [{"type": "choices", "value": {"choices": ["volume_up"]}}]}]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    assert store.set_labels(read_labels(tmp_path / "ls.json")) == 1
    data = labelled_texts(store, "intents")
    assert sorted(data.labels) == ["lights_off", "lights_on", "volume_up"]


def test_bad_label_files_are_clear_errors(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "store")
    (tmp_path / "x.csv").write_text("sample,label\n1,a\n")
    with pytest.raises(DataError, match="no column id"):
        read_labels(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("id,label\n" + "0" * 32 + ",a\n")
    with pytest.raises(SampleStoreError, match=r"no sample .* nothing was imported"):
        store.set_labels(read_labels(tmp_path / "y.csv"))
    with pytest.raises(DataError, match="does not exist"):
        read_labels(tmp_path / "missing.csv")
