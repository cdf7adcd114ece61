"""Labelled text data: loading, checking, and a reproducible stratified split."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_trainer.errors import DataError

PACKAGED_DATASET = Path(__file__).resolve().parent / "data" / "voice_commands.csv"
"""Voice commands for a smart-home / in-vehicle assistant: 10 intents, 36 examples each."""


@dataclass(frozen=True)
class LabelledTexts:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label_names(self) -> list[str]:
        return sorted(set(self.labels))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def load_labelled(path: Path, *, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """Read labelled texts from CSV, TSV, JSONL or Parquet (chosen by the file's suffix).

    Every row needs a non-empty text and label; a bad row is refused with its row number.
    """
    columns, rows = read_table(path)
    for column in (text_column, label_column):
        if column not in columns:
            raise DataError(f"data set {path} has no column {column!r} (columns: {', '.join(columns) or 'none'})")
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        text, label = row.get(text_column), row.get(label_column)
        text = text.strip() if isinstance(text, str) else ""
        label = str(label).strip() if label is not None and not isinstance(label, (dict, list)) else ""
        if not text or not label:
            raise DataError(
                f"data set {path} row {number}: empty or non-text {text_column if not text else label_column}"
            )
        texts.append(text)
        labels.append(label)
    if not texts:
        raise DataError(f"data set {path} has no rows")
    data = LabelledTexts(texts, labels)
    if len(data.label_names) < 2:
        raise DataError(f"data set {path} has only one label ({data.label_names[0]!r}); need at least two")
    return data


Rows = tuple[list[str], list[dict[str, Any]]]


def read_table(path: Path) -> Rows:
    """The column names and rows of a CSV, TSV, JSONL or Parquet file (chosen by its suffix)."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"data set {path}: unknown format {path.suffix!r}; use one of {', '.join(sorted(FORMATS))}")
    if not path.is_file():
        raise DataError(f"data set {path} does not exist or is not a file")
    reader = {"csv": _rows_delimited, "tsv": _rows_delimited, "jsonl": _rows_jsonl, "parquet": _rows_parquet}[kind]
    return reader(path)


def _rows_delimited(path: Path) -> Rows:
    delimiter = "\t" if FORMATS[path.suffix.lower()] == "tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read data set {path}: {exc}") from None


def _rows_jsonl(path: Path) -> Rows:
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data set {path}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"data set {path} line {number} is not JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"data set {path} line {number} is not a JSON object")
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return columns, rows


def _rows_parquet(path: Path) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"cannot read Parquet data set {path}: {exc}") from None
    return list(table.column_names), table.to_pylist()


def stratified_split(data: LabelledTexts, *, val_fraction: float, seed: int) -> tuple[LabelledTexts, LabelledTexts]:
    """Split each label's examples ``val_fraction`` into validation, reproducibly from ``seed``."""
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in zip(data.texts, data.labels, strict=True):
        by_label[label].append(text)
    rng = random.Random(seed)
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    for label in sorted(by_label):
        items = by_label[label]
        rng.shuffle(items)
        if len(items) < 2:
            raise DataError(f"label {label!r} has {len(items)} example; need at least 2 to split")
        cut = max(1, round(len(items) * val_fraction))
        val += [(t, label) for t in items[:cut]]
        train += [(t, label) for t in items[cut:]]
    rng.shuffle(train)
    rng.shuffle(val)
    return (
        LabelledTexts([t for t, _ in train], [label for _, label in train]),
        LabelledTexts([t for t, _ in val], [label for _, label in val]),
    )
