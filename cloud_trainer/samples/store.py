"""The cloud's sample store: what devices uploaded, partitioned by model and day, with labels.

Layout of a store directory::

    data/model=<model>/day=<YYYY-MM-DD>/part-<uuid>.parquet   records as they arrived (Hive partitions)
    index.sqlite                                              one row per prediction: query and label here
    write.lock                                                held while a batch is written (flock)

The Parquet files are append-only and immutable: ``pandas.read_parquet(store/"data")``,
``pyarrow.dataset.dataset(store/"data", partitioning="hive")`` and
``datasets.load_dataset("parquet", data_dir=...)`` read them as they are. The index holds one
row per prediction id with the current label (from device feedback or an import), every record
id ever received with the part that holds it, and every part with its record count, so
at-least-once delivery stores each record once.

A batch is stored in two steps, under ``write.lock``: its new records go to Parquet parts
(temporary name, fsync, rename), then one SQLite transaction names the parts and indexes the
records; if the transaction fails, the parts are removed again. Nothing is stored unless all of it
is: the batch was validated whole before (:meth:`SampleBatch.from_bytes`), and inserts are
strict (a row the index cannot take fails the batch instead of being skipped). A crash between
the two steps can leave one thing behind: a part that no ``parts`` row names. The index and
:meth:`SampleStore.parquet_files` ignore it; the collector removes it when it next opens the
store, and ``cloud-train samples verify --fix`` does too. The collector had not acknowledged that
batch, so the broker delivers it again. :meth:`SampleStore.verify` proves that the parts and the
index agree.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cloud_trainer.errors import CloudTrainError
from edge_agent.protocol.samples import SampleBatch, SampleRecord

log = logging.getLogger(__name__)

DEFAULT_ENV = "EDGELOOP_SAMPLES"
LOCK_FILE = "write.lock"
PART_GLOBS = ("part-*.parquet", ".part-*.tmp")
"""The files under ``data/`` the store writes: parts, and parts being written."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (id TEXT PRIMARY KEY, part TEXT);
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


@dataclass(frozen=True)
class StoreCheck:
    """What :meth:`SampleStore.verify` found.

    Attributes:
        parts, records, samples: the index's counts (``parts``, ``received`` and ``samples`` rows).
        problems: each way the Parquet parts and the index disagree, in words.
        orphans: part files (relative to the store) that no ``parts`` row names: a crash's leftover.
    """

    parts: int
    records: int
    samples: int
    problems: tuple[str, ...]
    orphans: tuple[str, ...]

    @property
    def agrees(self) -> bool:
        return not self.problems and not self.orphans


@dataclass(frozen=True)
class _Part:
    path: str  # relative to the store's root
    records: list[SampleRecord]


def _now() -> str:
    """UTC to the microsecond: labels imported one after another stay in order (the latest wins)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SampleStore:
    """Samples on disk. Thread-safe; one collector process at a time.

    Args:
        root: the store directory (created).
        collector: open as the collector: remove the parts a crash left unindexed first.
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
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise SampleStoreError(f"cannot open the sample store {root}: {exc}") from None
        self._lock = threading.Lock()
        if collector:
            self._remove_orphan_parts()

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        """Stores made before ``received.part`` existed get the column (NULL for their old rows)."""

        def missing() -> bool:
            return "part" not in {row[1] for row in self._db.execute("PRAGMA table_info(received)")}

        if not missing():
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if missing():  # another process may have added it meanwhile
                self._db.execute("ALTER TABLE received ADD COLUMN part TEXT")
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold ``write.lock``: from a batch's first Parquet byte to its index commit, and while
        orphans are listed or removed, so no process ever mistakes a batch in flight for a leftover."""
        try:
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SampleStoreError(f"cannot open {self.root / LOCK_FILE}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- writing --------------------------------------------------------------------------------
    def add_batch(self, batch: SampleBatch) -> AddResult:
        """Store the batch's records not seen before; return how many were new.

        All or nothing: if it raises, neither the index nor the Parquet data has changed (a crash
        can leave an unindexed part, which readers ignore and :meth:`remove_orphans` removes).
        """
        with self._lock, self._writing():
            ids = [r.id for r in batch.records]
            placeholders = ",".join("?" * len(ids))
            seen = {row[0] for row in self._db.execute(f"SELECT id FROM received WHERE id IN ({placeholders})", ids)}  # noqa: S608
            fresh = list({r.id: r for r in batch.records if r.id not in seen}.values())
            if not fresh:
                return AddResult(0, len(ids))
            parts = self._write_parts(fresh)
            try:
                self._index_parts(parts)
            except BaseException:
                self._discard(parts)
                raise
            return AddResult(len(fresh), len(ids) - len(fresh))

    def _index_parts(self, parts: list[_Part]) -> None:
        """One transaction: the parts, their records' ids, and the samples index."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for part in parts:
                self._db.execute("INSERT INTO parts(path, records) VALUES(?, ?)", (part.path, len(part.records)))
                for record in part.records:
                    self._db.execute("INSERT INTO received(id, part) VALUES(?, ?)", (record.id, part.path))
                    self._index(record)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _index(self, record: SampleRecord) -> None:
        # A prediction has one row: its sample record or its first feedback, whichever came first.
        # Only that conflict is expected; any other refusal (NOT NULL: a NaN binds as NULL) fails the batch.
        self._db.execute(
            "INSERT INTO samples(prediction_id, model, version, device, fleet, day, created_at, text,"
            " image_json, predicted, score, scores_json, reasons) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(prediction_id) DO NOTHING",
            (
                record.prediction_id, record.model, record.version, record.device, record.fleet,
                record.created_at[:10], record.created_at, record.text,
                json.dumps(record.image, allow_nan=False) if record.image is not None else None, record.predicted,
                record.score, json.dumps(record.scores, allow_nan=False), ",".join(record.reasons),
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

    def _write_parts(self, records: list[SampleRecord]) -> list[_Part]:
        """One part per model and day, each durable under its final name; on failure none is left."""
        groups: dict[tuple[str, str], list[SampleRecord]] = {}
        for record in records:  # created_at is normalised UTC: its first ten characters are its day
            groups.setdefault((record.model, record.created_at[:10]), []).append(record)
        written: list[_Part] = []
        try:
            for (model, day), group in groups.items():
                written.append(self._write_part(self.data_dir / f"model={model}" / f"day={day}", group))
        except BaseException:
            self._discard(written)
            raise
        return written

    def _write_part(self, directory: Path, group: list[SampleRecord]) -> _Part:
        import pyarrow as pa
        import pyarrow.parquet as pq

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
            "image_json": [json.dumps(r.image, allow_nan=False) if r.image is not None else None for r in group],
            "predicted": [r.predicted for r in group],
            "score": pa.array([r.score for r in group], pa.float32()),
            "scores_json": [json.dumps(r.scores, allow_nan=False) for r in group],
            "reasons": [",".join(r.reasons) for r in group],
            "label": [r.label for r in group],
        })  # fmt: skip
        name = uuid.uuid4().hex
        final = directory / f"part-{name}.parquet"
        temporary = directory / f".part-{name}.tmp"  # a dot: readers of the data set skip it
        try:
            pq.write_table(table, temporary, compression="zstd")
            with temporary.open("rb") as handle:
                os.fsync(handle.fileno())
            temporary.rename(final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(directory)
        return _Part(str(final.relative_to(self.root)), group)

    def _discard(self, parts: list[_Part]) -> None:
        for part in parts:
            try:
                (self.root / part.path).unlink(missing_ok=True)
            except OSError as exc:  # left as an orphan: verify reports it, the collector removes it
                log.warning("cannot remove %s, written for a batch that was not stored: %s", part.path, exc)

    def _part_files(self) -> list[str]:
        """The part files under ``data/`` (indexed or not), relative to the store's root."""
        found = {path for pattern in PART_GLOBS for path in self.data_dir.rglob(pattern)}
        return sorted(str(path.relative_to(self.root)) for path in found)

    def remove_orphans(self) -> list[str]:
        """Remove the part files no ``parts`` row names (a crash's leftovers); return their paths."""
        with self._lock, self._writing():
            known = {row[0] for row in self._db.execute("SELECT path FROM parts")}
            orphans = [path for path in self._part_files() if path not in known]
            for path in orphans:
                (self.root / path).unlink(missing_ok=True)
        return orphans

    def _remove_orphan_parts(self) -> None:
        for path in self.remove_orphans():
            log.warning("removed %s: written but never indexed (the batch will be delivered again)", path)

    # -- checking -------------------------------------------------------------------------------
    def verify(self) -> StoreCheck:
        """Check that the Parquet parts and the index agree; safe while a collector runs.

        Every ``parts`` row's file exists and holds exactly the record ids the index assigns it,
        with the row's count; every received id is in exactly one part; every record has its
        ``samples`` row and every ``samples`` row has a record; part files no row names are orphans.
        """
        with self._lock:
            self._db.execute("BEGIN")  # one snapshot of the index, taken at its first read
            try:
                with self._writing():  # no batch is between its Parquet write and its commit now
                    files = self._part_files()
                    parts: dict[str, int] = dict(self._db.execute("SELECT path, records FROM parts").fetchall())
                received: list[tuple[str, str | None]] = self._db.execute("SELECT id, part FROM received").fetchall()
                samples = {row[0] for row in self._db.execute("SELECT prediction_id FROM samples")}
            finally:
                self._db.execute("COMMIT")
        problems: list[str] = []
        holder, predictions, broken = self._read_parts(parts, problems)
        for record_id, part in received:
            found = holder.get(record_id)
            if found is None and part not in broken:  # a broken part is reported once, not per record
                problems.append(f"record {record_id} is indexed{f' in {part}' if part else ''} but in no part file")
            elif found is not None and part is not None and found != part:
                problems.append(f"record {record_id} is indexed in {part} but is in {found}")
        indexed = {record_id for record_id, _part in received}
        problems += [f"{path}: record {rid} is not indexed" for rid, path in holder.items() if rid not in indexed]
        unbacked = sorted(samples - predictions)
        if broken and unbacked:
            problems.append(f"{len(unbacked)} samples rows have no record in the parts that could be read")
        else:
            problems += [f"sample {pid} has no record in any part" for pid in unbacked]
        problems += [
            f"prediction {pid}: its records are in Parquet but it has no samples row (list and export miss it)"
            for pid in sorted(predictions - samples)
        ]
        orphans = tuple(path for path in files if path not in parts)
        return StoreCheck(len(parts), len(received), len(samples), tuple(problems), orphans)

    def _read_parts(self, parts: dict[str, int], problems: list[str]) -> tuple[dict[str, str], set[str], set[str]]:
        """Which part holds each record id, the prediction ids of all records, and the parts that
        are missing or unreadable; each disagreement goes to ``problems``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        holder: dict[str, str] = {}
        predictions: set[str] = set()
        broken: set[str] = set()
        for path, count in sorted(parts.items()):
            file = self.root / path
            if not file.is_file():
                problems.append(f"{path}: missing ({count} records indexed)")
                broken.add(path)
                continue
            try:
                table = pq.ParquetFile(file).read(columns=["id", "prediction_id"])
            except (OSError, ValueError, pa.ArrowException) as exc:
                problems.append(f"{path}: unreadable ({count} records indexed): {exc}")
                broken.add(path)
                continue
            ids = [str(value) for value in table.column("id").to_pylist()]
            predictions.update(str(value) for value in table.column("prediction_id").to_pylist())
            if len(ids) != count:
                problems.append(f"{path}: holds {len(ids)} records; the index says {count}")
            for record_id in ids:
                if record_id in holder:
                    problems.append(f"record {record_id} is in two parts: {holder[record_id]} and {path}")
                else:
                    holder[record_id] = path
        return holder, predictions, broken

    def parquet_files(self) -> list[Path]:
        """The indexed parts: read these (``pyarrow.dataset.dataset(files, partitioning="hive",
        partition_base_dir=...)``) to be sure of never seeing a crash's leftover."""
        with self._lock:
            rows = self._db.execute("SELECT path FROM parts ORDER BY path").fetchall()
        return [self.root / row[0] for row in rows]

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
