"""Labelled data in every supported format, and the stratified split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloud_trainer.errors import DataError
from cloud_trainer.training.data import LabelledTexts, load_labelled, stratified_split

ROWS = [
    ("turn on the lights", "on"),
    ("lights off please", "off"),
    ("it's dark in here", "on"),
    ("kill the lamp", "off"),
]


def write(path: Path) -> Path:
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writerow(["utterance", "intent", "extra"])
            writer.writerows([(t, label, "x") for t, label in ROWS])
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"utterance": t, "intent": label, "extra": 1}) + "\n" for t, label in ROWS))
    else:
        table = pa.table({"utterance": [t for t, _ in ROWS], "intent": [label for _, label in ROWS]})
        pq.write_table(table, path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_format_loads_with_named_columns(tmp_path: Path, suffix: str) -> None:
    data = load_labelled(write(tmp_path / f"d{suffix}"), text_column="utterance", label_column="intent")
    assert list(zip(data.texts, data.labels, strict=True)) == ROWS


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_missing_column_is_named(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(DataError, match="has no column 'text'"):
        load_labelled(write(tmp_path / f"d{suffix}"), label_column="intent")


def test_bad_rows_and_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_labelled(bad)
    empty_label = tmp_path / "e.csv"
    empty_label.write_text("text,label\nhello,\n")
    with pytest.raises(DataError, match="row 1: empty or non-text label"):
        load_labelled(empty_label)
    with pytest.raises(DataError, match=r"unknown format '\.xlsx'"):
        load_labelled(tmp_path / "d.xlsx")
    one_label = tmp_path / "one.csv"
    one_label.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="only one label"):
        load_labelled(one_label)


def test_stratified_split_is_reproducible_and_keeps_every_label() -> None:
    data = LabelledTexts([f"t{i}" for i in range(100)], [f"l{i % 4}" for i in range(100)])
    train, val = stratified_split(data, val_fraction=0.2, seed=7)
    again, _ = stratified_split(data, val_fraction=0.2, seed=7)
    assert train.texts == again.texts
    assert len(val) == 20
    assert sorted(set(val.labels)) == ["l0", "l1", "l2", "l3"]
    assert set(train.texts).isdisjoint(val.texts)
