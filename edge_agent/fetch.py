"""Bundle download over MQTT: content-addressed chunks, verified on arrival, resumable.

Chunks are retained on ``{root}/{fleet}/chunks/{sha256}``. The fetcher subscribes to a sliding
window of the chunks it lacks, keeps each one only after its sha256 matches its topic, and
unsubscribes. What is already in the store (from an interrupted attempt or from another version)
is never requested again.

paho's network thread only checks a chunk and hands it over; the fetching thread writes and
fsyncs it, so a slow disk never stalls the MQTT connection. At most ``window`` chunks wait in memory.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.protocol.errors import IntegrityError, ProtocolError
from edge_agent.protocol.manifest import MANIFEST_NAME, Manifest, safe_relative_path, sha256_bytes
from edge_agent.protocol.topics import Topics
from edge_agent.store import ModelStore, fsync_dir
from edge_agent.transport import MqttTransport

Progress = Callable[[int, int], None]
"""``progress(bytes_held, bytes_total)``"""


class FetchTimeout(ProtocolError):
    """The broker delivered no chunk for longer than the configured timeout."""


class FetchRefused(ProtocolError):
    """The broker refused the subscription to a chunk (an ACL): named at once, not after a timeout."""


class FetchCancelled(ProtocolError):
    """The caller cancelled the download (a newer release arrived)."""


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
        self._arrived: dict[str, bytes] = {}
        self._fatal: str | None = None
        self._refused: str | None = None
        self._last_error: str | None = None

    def fetch(
        self,
        sizes: dict[str, int],
        *,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> int:
        """Make sure every chunk named in ``sizes`` (chunk id -> its exact size) is in the store.

        Returns the bytes transferred. Raises :class:`IntegrityError` for a chunk whose bytes match
        its id but not its declared size (the release is wrong: no retry helps),
        :class:`FetchRefused`, :class:`FetchTimeout` or :class:`FetchCancelled`.
        """
        missing = [c for c in sizes if not self._store.has_chunk(c)]
        total = sum(sizes.values())
        held = total - sum(sizes[c] for c in missing)
        transferred = 0
        pending = list(reversed(missing))
        outstanding: set[str] = set()
        with self._cond:
            self._arrived.clear()
            self._fatal = self._refused = self._last_error = None
        last_progress = time.monotonic()
        try:
            while pending or outstanding:
                if cancelled():
                    raise FetchCancelled("download cancelled")
                while pending and len(outstanding) < self._window:
                    chunk = pending.pop()
                    outstanding.add(chunk)
                    self._transport.subscribe(
                        self._topics.chunk(chunk), self._make_handler(chunk, sizes[chunk]), on_refused=self._on_refused
                    )
                done = self._wait_arrivals(outstanding)
                for chunk, payload in done.items():
                    outstanding.discard(chunk)
                    self._transport.unsubscribe(self._topics.chunk(chunk))
                    if not self._store.has_chunk(chunk):
                        self._store.put_chunk(chunk, payload)  # write + fsync here, off the network thread
                    transferred += len(payload)
                    held += len(payload)
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
            with self._cond:
                self._arrived.clear()
        return transferred

    def _wait_arrivals(self, outstanding: set[str]) -> dict[str, bytes]:
        """The wanted chunks that arrived (waiting a moment for one), or raise what went wrong."""
        with self._cond:
            if not self._arrived and self._fatal is None and self._refused is None:
                self._cond.wait(timeout=0.2)
            if self._fatal is not None:
                raise IntegrityError(self._fatal)
            if self._refused is not None:
                raise FetchRefused(self._refused)
            return {c: self._arrived.pop(c) for c in list(self._arrived) if c in outstanding}

    def _on_refused(self, topic: str, reason: str) -> None:
        with self._cond:
            self._refused = f"the broker refused the subscription to {topic}: {reason}"
            self._cond.notify()

    def _make_handler(self, chunk: str, size: int) -> Callable[[str, bytes, bool], None]:
        def on_chunk(_topic: str, payload: bytes, _retained: bool) -> None:
            if not payload:
                return  # a cleared retained chunk
            if sha256_bytes(payload) != chunk:
                problem, fatal = f"chunk {chunk[:12]}… arrived with the wrong sha256 (someone else's bytes)", False
            elif len(payload) != size:  # the signed manifest names these very bytes: the release is wrong
                problem, fatal = f"chunk {chunk[:12]}… is {len(payload)} bytes, the manifest says {size}", True
            else:
                problem, fatal = None, False
            with self._cond:
                if problem is None:
                    self._arrived[chunk] = payload
                elif fatal:
                    self._fatal = problem
                else:
                    self._last_error = problem
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
