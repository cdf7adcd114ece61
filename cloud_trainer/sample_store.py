"""The cloud's sample store: what devices uploaded, partitioned by model and day, with labels.

Layout of a store directory::

    data/model=<model>/day=<YYYY-MM-DD>/part-<uuid>.parquet   records as they arrived (Hive partitions)
    index.sqlite                                              one row per prediction: query and label here

The Parquet files are append-only and immutable: ``pandas.read_parquet(store/"data")``,
``pyarrow.dataset.dataset(store/"data", partitioning="hive")`` and
``datasets.load_dataset("parquet", data_dir=...)`` read them as they are. The index holds one
row per prediction id with the current label (from device feedback or an import), and every
record id ever received, so at-least-once delivery stores each record once.

A batch is stored in two steps: its new records go to a Parquet part (temporary name, fsync,
rename), then one SQLite transaction indexes them and names the part. A crash between the two
leaves an unreferenced part, removed when the store is next opened; the collector had not yet
acknowledged the batch, so the broker delivers it again.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cloud_trainer.errors import CloudTrainError
from edge_agent.protocol.samples import SampleBatch, SampleRecord

log = logging.getLogger(__name__)

DEFAULT_ENV = "EDGELOOP_SAMPLES"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS parts (path TEXT PRIMARY KEY, records INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    prediction_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    device TEXT NOT NULL,
    fleet TEXT NOT NULL,
    day TEXT NOT NULL,
    created_at TEXT NOT NULL,
    text TEXT,
    image_json TEXT,
    predicted TEXT NOT NULL,
    score REAL NOT NULL,
    scores_json TEXT NOT NULL,
    reasons TEXT NOT NULL,
    label TEXT,
    label_source TEXT,
    labelled_at TEXT
);
CREATE INDEX IF NOT EXISTS samples_by_model_day ON samples(model, day);
CREATE INDEX IF NOT EXISTS samples_by_label ON samples(model, label);
"""

COLUMNS = (
    "prediction_id", "model", "version", "device", "fleet", "day", "created_at", "text", "image_json",
    "predicted", "score", "scores_json", "reasons", "label", "label_source", "labelled_at",
)  # fmt: skip


class SampleStoreError(CloudTrainError):
    """The store cannot be opened, or a query or import names something it does not hold."""


def default_store() -> Path:
    return Path(os.environ.get(DEFAULT_ENV, Path.home() / ".edgeloop" / "samples"))


@dataclass(frozen=True)
class StoredSample:
    prediction_id: str
    model: str
    version: int
    device: str
    fleet: str
    day: str
    created_at: str
    text: str | None
    image_json: str | None
    predicted: str
    score: float
    scores_json: str
    reasons: str
    label: str | None
    label_source: str | None
    labelled_at: str | None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {name: getattr(self, name) for name in COLUMNS}
        data["scores"] = json.loads(data.pop("scores_json"))
        image = data.pop("image_json")
        data["image"] = json.loads(image) if image else None
        return data


@dataclass(frozen=True)
class AddResult:
    new_records: int
    duplicates: int


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class SampleStore:
    """Samples on disk. Thread-safe; one collector process at a time.

    Args:
        root: the store directory (created).
        collector: open as the collector, the one writer of Parquet parts: only it removes parts
            left unindexed by a crash (another process could be looking at the collector's
            part in the instant between its rename and its index commit).
    """

    def __init__(self, root: Path, *, collector: bool = False) -> None:
        self.root = root
        self.data_dir = root / "data"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(root / "index.sqlite"), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise SampleStoreError(f"cannot open the sample store {root}: {exc}") from None
        self._lock = threading.Lock()
        if collector:
            self._remove_orphan_parts()

    def close(self) -> None:
        self._db.close()

    # -- writing --------------------------------------------------------------------------------
    def add_batch(self, batch: SampleBatch) -> AddResult:
        """Store the batch's records not seen before; return how many were new."""
        with self._lock:
            ids = [r.id for r in batch.records]
            placeholders = ",".join("?" * len(ids))
            seen = {row[0] for row in self._db.execute(f"SELECT id FROM received WHERE id IN ({placeholders})", ids)}  # noqa: S608
            fresh = list({r.id: r for r in batch.records if r.id not in seen}.values())
            if not fresh:
                return AddResult(0, len(ids))
            parts = self._write_parts(fresh)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for path, count in parts:
                    self._db.execute("INSERT INTO parts(path, records) VALUES(?, ?)", (path, count))
                for record in fresh:
                    self._db.execute("INSERT INTO received(id) VALUES(?)", (record.id,))
                    self._index(record)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return AddResult(len(fresh), len(ids) - len(fresh))

    def _index(self, record: SampleRecord) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO samples(prediction_id, model, version, device, fleet, day, created_at, text,"
            " image_json, predicted, score, scores_json, reasons) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                record.prediction_id, record.model, record.version, record.device, record.fleet,
                record.created_at[:10], record.created_at, record.text,
                json.dumps(record.image) if record.image is not None else None, record.predicted, record.score,
                json.dumps(record.scores), ",".join(record.reasons),
            ),
        )  # fmt: skip
        if record.kind == "feedback" and record.label is not None:
            self._db.execute(
                "UPDATE samples SET label = ?, label_source = 'device', labelled_at = ? WHERE prediction_id = ?"
                " AND (label_source IS NULL OR label_source = 'device')",
                (record.label, record.created_at, record.prediction_id),
            )
            self._db.execute(
                "UPDATE samples SET reasons = reasons || ',feedback' WHERE prediction_id = ?"
                " AND instr(reasons, 'feedback') = 0",
                (record.prediction_id,),
            )

    def _write_parts(self, records: list[SampleRecord]) -> list[tuple[str, int]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        groups: dict[tuple[str, str], list[SampleRecord]] = {}
        for record in records:
            groups.setdefault((record.model, record.created_at[:10]), []).append(record)
        written = []
        for (model, day), group in groups.items():
            directory = self.data_dir / f"model={model}" / f"day={day}"
            directory.mkdir(parents=True, exist_ok=True)
            table = pa.table({
                "id": [r.id for r in group],
                "kind": [r.kind for r in group],
                "prediction_id": [r.prediction_id for r in group],
                "device": [r.device for r in group],
                "fleet": [r.fleet for r in group],
                "version": pa.array([r.version for r in group], pa.int32()),
                "created_at": [r.created_at for r in group],
                "text": [r.text for r in group],
                "image_json": [json.dumps(r.image) if r.image is not None else None for r in group],
                "predicted": [r.predicted for r in group],
                "score": pa.array([r.score for r in group], pa.float32()),
                "scores_json": [json.dumps(r.scores) for r in group],
                "reasons": [",".join(r.reasons) for r in group],
                "label": [r.label for r in group],
            })  # fmt: skip
            name = uuid.uuid4().hex
            final = directory / f"part-{name}.parquet"
            temporary = directory / f".part-{name}.tmp"  # a dot: readers of the data set skip it
            pq.write_table(table, temporary, compression="zstd")
            with temporary.open("rb") as handle:
                os.fsync(handle.fileno())
            temporary.rename(final)
            written.append((str(final.relative_to(self.root)), len(group)))
        return written

    def _remove_orphan_parts(self) -> None:
        known = {row[0] for row in self._db.execute("SELECT path FROM parts")}
        for path in [*self.data_dir.rglob("part-*"), *self.data_dir.rglob(".part-*")]:
            relative = str(path.relative_to(self.root))
            if relative not in known:
                log.warning("removing %s: written but never indexed (the batch will be delivered again)", path)
                path.unlink()

    # -- reading --------------------------------------------------------------------------------
    def query(
        self,
        *,
        model: str | None = None,
        labelled: bool | None = None,
        device: str | None = None,
        day: str | None = None,
        limit: int | None = None,
    ) -> list[StoredSample]:
        where, args = [], []
        for column, value in (("model", model), ("device", device), ("day", day)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if labelled is not None:
            where.append("label IS NOT NULL" if labelled else "label IS NULL")
        sql = f"SELECT {', '.join(COLUMNS)} FROM samples"  # noqa: S608 - column names are ours
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, prediction_id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [StoredSample(*row) for row in rows]

    def get(self, prediction_id: str) -> StoredSample:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM samples WHERE prediction_id = ?",  # noqa: S608
                (prediction_id,),
            ).fetchone()
        if row is None:
            raise SampleStoreError(f"no sample {prediction_id!r} in {self.root}")
        return StoredSample(*row)

    def counts(self) -> dict[str, int]:
        with self._lock:
            total, labelled = self._db.execute("SELECT COUNT(*), COUNT(label) FROM samples").fetchone()
            received = self._db.execute("SELECT COUNT(*) FROM received").fetchone()[0]
        return {"samples": int(total), "labelled": int(labelled), "records_received": int(received)}

    # -- labels ---------------------------------------------------------------------------------
    def set_labels(self, labels: Iterable[tuple[str, str]], *, source: str = "import") -> int:
        """Set the label of each ``(prediction_id, label)``; every id must exist. Returns the count."""
        pairs = list(labels)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for prediction_id, label in pairs:
                    cursor = self._db.execute(
                        "UPDATE samples SET label = ?, label_source = ?, labelled_at = ? WHERE prediction_id = ?",
                        (label, source, _now(), prediction_id),
                    )
                    if cursor.rowcount == 0:
                        raise SampleStoreError(f"no sample {prediction_id!r} in {self.root}; nothing was imported")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(pairs)
