"""Bundle download over MQTT: content-addressed chunks, verified on arrival, resumable.

Chunks are retained on ``{root}/{fleet}/chunks/{sha256}``. The fetcher subscribes to a sliding
window of the chunks it lacks, keeps each one only after its sha256 matches its topic, and
unsubscribes. What is already in the store (from an interrupted attempt or from another version)
is never requested again.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.protocol.chunks import check_chunk
from edge_agent.protocol.errors import IntegrityError, ProtocolError
from edge_agent.protocol.manifest import MANIFEST_NAME, Manifest, safe_relative_path
from edge_agent.protocol.topics import Topics
from edge_agent.store import ModelStore, fsync_dir
from edge_agent.transport import MqttTransport

Progress = Callable[[int, int], None]
"""``progress(bytes_held, bytes_total)``"""


class FetchTimeout(ProtocolError):
    """The broker delivered no chunk for longer than the configured timeout."""


class ChunkFetcher:
    """Fetches chunks into a :class:`ModelStore`.

    Args:
        transport: the agent's MQTT connection.
        topics: topic builder for the agent's fleet.
        store: where verified chunks are kept.
        timeout_s: give up when no wanted chunk arrives for this long.
        window: how many chunks are requested at once.
    """

    def __init__(
        self, *, transport: MqttTransport, topics: Topics, store: ModelStore, timeout_s: float, window: int
    ) -> None:
        self._transport = transport
        self._topics = topics
        self._store = store
        self._timeout_s = timeout_s
        self._window = window
        self._cond = threading.Condition()
        self._arrived: set[str] = set()
        self._sizes: dict[str, int] = {}
        self._last_error: str | None = None

    def fetch(
        self, chunk_ids: list[str], *, sizes: dict[str, int] | None = None, progress: Progress | None = None
    ) -> int:
        """Make sure every chunk in ``chunk_ids`` is in the store; return the bytes transferred."""
        wanted = list(dict.fromkeys(chunk_ids))
        missing = [c for c in wanted if not self._store.has_chunk(c)]
        sizes = sizes or {}
        total = sum(sizes.get(c, 0) for c in wanted)
        held = total - sum(sizes.get(c, 0) for c in missing)
        transferred = 0
        pending = list(reversed(missing))
        outstanding: set[str] = set()
        self._arrived.clear()
        self._last_error = None
        last_progress = time.monotonic()
        try:
            while pending or outstanding:
                while pending and len(outstanding) < self._window:
                    chunk = pending.pop()
                    outstanding.add(chunk)
                    self._transport.subscribe(self._topics.chunk(chunk), self._make_handler(chunk))
                with self._cond:
                    if not self._arrived:
                        self._cond.wait(timeout=0.5)
                    done = self._arrived & outstanding
                    self._arrived -= done
                for chunk in done:
                    outstanding.discard(chunk)
                    self._transport.unsubscribe(self._topics.chunk(chunk))
                    size = self._sizes.pop(chunk, 0)
                    transferred += size
                    held += size
                if done:
                    last_progress = time.monotonic()
                    if progress:
                        progress(held, total)
                elif time.monotonic() - last_progress > self._timeout_s:
                    reason = f" (last problem: {self._last_error})" if self._last_error else ""
                    raise FetchTimeout(
                        f"{len(outstanding) + len(pending)} chunk(s) not delivered by the broker within "
                        f"{self._timeout_s:g}s, e.g. {next(iter(outstanding))[:12]}…{reason}"
                    )
        finally:
            for chunk in outstanding:
                self._transport.unsubscribe(self._topics.chunk(chunk))
        return transferred

    def _make_handler(self, chunk: str) -> Callable[[str, bytes, bool], None]:
        def on_chunk(_topic: str, payload: bytes, _retained: bool) -> None:
            if not payload:
                return  # a cleared retained chunk
            try:
                check_chunk(chunk, payload)
            except IntegrityError as exc:
                self._last_error = str(exc)
                return
            if not self._store.has_chunk(chunk):
                self._store.put_chunk(chunk, payload)
            with self._cond:
                self._sizes[chunk] = len(payload)
                self._arrived.add(chunk)
                self._cond.notify()

        return on_chunk


def assemble_bundle(store: ModelStore, manifest: Manifest, manifest_bytes: bytes, staging: Path) -> None:
    """Write every file of ``manifest`` into ``staging`` from held chunks, checking size and sha256.

    Files are written under a temporary name, fsynced and renamed; a file that grows past its
    declared size is refused before more is written (endless-data attack).
    """
    for entry in manifest.files:
        target = staging / safe_relative_path(entry.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        digest = hashlib.sha256()
        written = 0
        with tmp.open("wb") as out:
            for chunk in entry.chunks:
                data = store.chunk_path(chunk).read_bytes()
                written += len(data)
                if written > entry.size:
                    raise IntegrityError(f"bundle file {entry.path!r} is larger than the {entry.size} bytes declared")
                digest.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if written != entry.size:
            raise IntegrityError(f"bundle file {entry.path!r} has {written} bytes, the manifest says {entry.size}")
        if digest.hexdigest() != entry.sha256:
            raise IntegrityError(
                f"bundle file {entry.path!r} has sha256 {digest.hexdigest()[:12]}…, "
                f"the manifest says {entry.sha256[:12]}…"
            )
        os.replace(tmp, target)
    (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
    fsync_dir(staging)
