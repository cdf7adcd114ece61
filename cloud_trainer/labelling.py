"""Labelling collected samples: export them for people (CSV, Label Studio) and import their labels.

CSV export columns: ``id, text, predicted, score, reasons, device, version, day, label`` (``label``
empty for unlabelled samples). A labelled CSV comes back with at least ``id`` and ``label``; rows
with an empty label are skipped.

Label Studio: the export is a JSON list of tasks ``{"id": n, "data": {"sample_id", "text", ...},
"predictions": [...]}`` (the model's guess pre-annotated as a choice of the ``label`` control); the
import reads Label Studio's JSON export, taking each task's latest non-cancelled annotation.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from cloud_trainer.data import LabelledTexts
from cloud_trainer.errors import DataError
from cloud_trainer.sample_store import SampleStore, StoredSample

CSV_COLUMNS = ["id", "text", "predicted", "score", "reasons", "device", "version", "day", "label"]


def _cell(text: str | None) -> str:
    """A cell a spreadsheet shows as text: a leading = + - @ would run as a formula (CSV injection)."""
    value = text or ""
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value


def export_csv(samples: list[StoredSample], path: Path) -> int:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for s in samples:
            writer.writerow([s.prediction_id, _cell(s.text or s.image_json), _cell(s.predicted), f"{s.score:.4f}",
                             s.reasons, s.device, s.version, s.day, _cell(s.label)])  # fmt: skip
    return len(samples)


def export_label_studio(samples: list[StoredSample], path: Path) -> int:
    tasks = []
    for number, s in enumerate(samples, start=1):
        tasks.append({
            "id": number,
            "data": {"sample_id": s.prediction_id, "text": s.text, "device": s.device, "version": s.version},
            "predictions": [{
                "model_version": str(s.version),
                "score": s.score,
                "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                            "value": {"choices": [s.predicted]}}],
            }],
        })  # fmt: skip
    path.write_text(json.dumps(tasks, indent=1, ensure_ascii=False), encoding="utf-8")
    return len(tasks)


def read_labels(path: Path) -> list[tuple[str, str]]:
    """``(sample id, label)`` pairs from a labelled CSV or a Label Studio JSON export."""
    if not path.is_file():
        raise DataError(f"label file {path} does not exist")
    if path.suffix.lower() == ".json":
        return _read_label_studio(path)
    if path.suffix.lower() != ".csv":
        raise DataError(f"label file {path}: use a .csv (id,label columns) or a Label Studio .json export")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(handle)
        missing = {"id", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"label file {path} has no column {', '.join(sorted(missing))}")
        return [(row["id"].strip(), row["label"].strip()) for row in reader if (row.get("label") or "").strip()]


def _read_label_studio(path: Path) -> list[tuple[str, str]]:
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"label file {path} is not JSON: {exc}") from None
    if not isinstance(tasks, list):
        raise DataError(f"label file {path} is not a Label Studio export (a JSON list of tasks)")
    pairs = []
    for index, task in enumerate(tasks):
        sample_id = _get(task, "data", "sample_id")
        if not isinstance(sample_id, str):
            raise DataError(f"label file {path}: task {index} has no data.sample_id")
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            continue
        choices = [r for r in annotations[-1].get("result") or [] if r.get("type") == "choices"]
        labels = _get(choices[0], "value", "choices") if choices else None
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            pairs.append((sample_id, labels[0]))
    return pairs


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def labelled_texts(store: SampleStore, model: str) -> LabelledTexts:
    """Every labelled text sample of ``model``, for training."""
    latest: dict[str, str] = {}  # one label per text: the latest labelled wins
    for s in sorted(store.query(model=model, labelled=True), key=lambda s: s.labelled_at or ""):
        if s.text and s.label:
            latest[s.text] = s.label
    return LabelledTexts(texts=list(latest), labels=list(latest.values()))
