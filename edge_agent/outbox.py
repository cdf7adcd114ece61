"""The durable outbox: samples wait here, on disk, until the broker has acknowledged them.

SQLite in WAL mode with ``synchronous=FULL``: a record is on disk when :meth:`Outbox.put` returns,
so it survives kill -9 and power loss. The outbox is bounded by bytes; when a put would pass the
bound the oldest records are dropped, and the number dropped is counted (persistently) and
reported. Nothing is lost while there is room. A full disk drops the new records instead (counted
too): the agent goes on serving.

Records leave only through :meth:`ack`, after the broker's PUBACK for the batch that carried them;
a crash before that sends them again (at-least-once), and the cloud stores each id once.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    id: str
    body: bytes


@dataclass(frozen=True)
class OutboxStats:
    queued: int
    bytes: int
    dropped: int
    """records dropped because the outbox was full (oldest first) or the disk was, since it was created"""
    uploaded: int


class OutboxError(OSError):
    """The outbox file cannot be opened (a bad path, a read-only or corrupt file)."""


class Outbox:
    """A bounded, durable FIFO of ``(id, body)`` records. Thread-safe.

    Args:
        path: the SQLite file (created with its directory).
        max_bytes: the most body bytes kept; past it, the oldest records are dropped.
    """

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._lost_in_memory = 0  # drops that could not be written down (disk full, bad records)
        try:
            row = self._open()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # permissions, a missing directory: the operator's to fix
                raise OutboxError(f"cannot open the sample outbox {path}: {exc}") from None
            # A corrupt file must not keep the agent from serving: set it aside, start afresh.
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            log.error("sample outbox %s is corrupt (%s): moved to %s; its samples are lost", path, exc, aside)
            if hasattr(self, "_db"):
                self._db.close()
            path.rename(aside)
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            try:
                row = self._open()
            except sqlite3.Error as again:
                raise OutboxError(f"cannot open the sample outbox {path}: {again}") from None
        self._count, self._bytes = int(row[0]), int(row[1])
        self._dropped = self._counter("dropped")
        self._uploaded = self._counter("uploaded")

    def _open(self) -> tuple[int, int]:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM items").fetchone()
        return int(row[0]), int(row[1])

    def count_lost(self, count: int) -> None:
        """Count samples that never reached the outbox (a full writer queue, a record that cannot be stored)."""
        with self._lock:
            self._lost_in_memory += count

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, name: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, by, by),
        )

    def put(self, records: list[tuple[str, bytes]]) -> int:
        """Store ``records`` durably (one transaction); return how many old records were dropped for room.

        A record whose id is already queued is ignored. A record larger than ``max_bytes`` is dropped.
        """
        with self._lock:
            try:
                return self._put(records)
            except sqlite3.OperationalError as exc:  # "database or disk is full", I/O errors
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._lost_in_memory += len(records)
                log.error("outbox: %d samples dropped, cannot write %s: %s", len(records), self.path, exc)
                return 0

    def _put(self, records: list[tuple[str, bytes]]) -> int:
        self._db.execute("BEGIN IMMEDIATE")
        added_count, added_bytes, too_big = 0, 0, 0
        for record_id, body in records:
            if len(body) > self.max_bytes:
                too_big += 1
                continue
            cursor = self._db.execute("INSERT OR IGNORE INTO items(id, body) VALUES(?, ?)", (record_id, body))
            if cursor.rowcount:
                added_count += 1
                added_bytes += len(body)
        count, total = self._count + added_count, self._bytes + added_bytes
        dropped = 0
        while total > self.max_bytes:
            rows = self._db.execute(
                "SELECT seq, LENGTH(body) FROM items ORDER BY seq LIMIT ?", (max(1, count // 10),)
            ).fetchall()
            cut = []
            for seq, size in rows:
                if total <= self.max_bytes:
                    break
                cut.append(seq)
                total -= int(size)
                count -= 1
            self._db.execute(f"DELETE FROM items WHERE seq IN ({','.join('?' * len(cut))})", cut)  # noqa: S608
            dropped += len(cut)
        if dropped or too_big:
            self._bump("dropped", dropped + too_big)
        self._db.execute("COMMIT")
        self._count, self._bytes = count, total
        self._dropped += dropped + too_big
        if dropped:
            log.warning("outbox full (%d bytes): dropped the %d oldest samples", self.max_bytes, dropped)
        return dropped

    def peek(self, *, max_items: int) -> list[OutboxItem]:
        """The oldest ``max_items`` records, still queued."""
        with self._lock:
            rows = self._db.execute("SELECT seq, id, body FROM items ORDER BY seq LIMIT ?", (max_items,)).fetchall()
        return [OutboxItem(int(seq), str(item_id), bytes(body)) for seq, item_id, body in rows]

    def discard(self, items: list[OutboxItem]) -> None:
        """Remove ``items`` that can never be sent (unreadable, too large), counting them as dropped."""
        self._remove(items, counter="dropped")

    def ack(self, items: list[OutboxItem]) -> None:
        """Remove ``items``: the broker has them."""
        self._remove(items, counter="uploaded")

    def _remove(self, items: list[OutboxItem], *, counter: str) -> None:
        if not items:
            return
        with self._lock:
            seqs = [item.seq for item in items]
            self._db.execute("BEGIN IMMEDIATE")
            placeholders = ",".join("?" * len(seqs))
            row = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM items WHERE seq IN ({placeholders})",  # noqa: S608
                seqs,
            ).fetchone()
            self._db.execute(f"DELETE FROM items WHERE seq IN ({placeholders})", seqs)  # noqa: S608
            self._bump(counter, int(row[0]))
            self._db.execute("COMMIT")
            self._count -= int(row[0])
            self._bytes -= int(row[1])
            if counter == "uploaded":
                self._uploaded += int(row[0])
            else:
                self._dropped += int(row[0])

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(
                queued=self._count,
                bytes=self._bytes,
                dropped=self._dropped + self._lost_in_memory,
                uploaded=self._uploaded,
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
